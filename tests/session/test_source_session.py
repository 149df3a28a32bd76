"""SourceSession, one transition of SOURCE_TRANSITIONS at a time (preempt on and off).

The driver answers Connect and StopGuest at once, as the shell does (its
follow-up inputs are handled before the rest of the batch).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from session_drivers import (
    BLOCK,
    BLOCK_LEN,
    ODD_BLOCK,
    ODD_LEN,
    Src,
    SwitchoverPolicy,
    bitmap,
    of_type,
    source_blocks,
    transitions_of,
)

from postcopy import wire
from postcopy.session import SourceSession
from postcopy.session import (
    SOURCE_TRANSITIONS,
    BreakLink,
    BulkFinished,
    Channel,
    ChannelFailed,
    CloseChannels,
    Connect,
    ConnectFailed,
    Connected,
    Finish,
    EndRound,
    MarkAllDirty,
    RoundFinished,
    ScanDirty,
    SendDiscards,
    StartRound,
    StopTracking,
    MigrationStatus,
    PauseRequested,
    ReloadDirty,
    ResumeRequested,
    StartBulk,
    StartPostcopy,
    StartReturnPath,
    StatusChanged,
    StopGuest,
    Trigger,
    Write,
)
from postcopy.session._destination import PREEMPT_REQUESTS_PING
from postcopy.session._source import BULK_HOLD_SECONDS, READY_PING, _encode

READY_PING_BYTES = wire.encode(wire.Ping(value=READY_PING))

S = MigrationStatus
T = Trigger
Scenario = Callable[[bool], tuple[Src, S, list]]


def _failed_kind(s: Src, acts: list, kind: str) -> None:
    fin = of_type(acts, Finish)
    assert len(fin) == 1 and fin[0].error is not None and fin[0].error.kind == kind, fin
    assert CloseChannels() in acts


def _writes(acts: list, channel: Channel = Channel.MAIN) -> bytes:
    return b"".join(a.data for a in acts if isinstance(a, Write) and a.channel is channel)


def _attempt_failed_checks(s: Src, acts: list, errors_before: int) -> None:
    assert BreakLink() in acts and CloseChannels() in acts
    assert len(s.s.recovery_errors) == errors_before + 1
    assert s.s.status is S.POSTCOPY_PAUSED, "a failed recovery attempt must leave the migration paused, not failed"
    assert s.s.error is None
    assert s.s.retry_at is not None


# -- up to RUN ------------------------------------------------------------------------------------


def none_start(preempt: bool):
    s = Src(preempt=preempt)
    acts = s.s.start(s.now)     # no auto-answer: the Connect itself is checked
    assert acts == [StatusChanged(S.SETUP), Connect(Channel.MAIN)]
    return s, S.NONE, acts


def setup_stream_started(preempt: bool):
    s = Src(preempt=preempt, hold_switchover=True)
    acts = s.start()
    assert _writes(acts).startswith(_encode(s.s.preamble()))
    assert StartReturnPath() in acts
    if preempt:
        assert Connect(Channel.PREEMPT) in acts
    assert not of_type(acts, StopGuest)             # held until StartPostcopy
    return s, S.SETUP, acts


def active_run(preempt: bool):
    s = Src(preempt=preempt).to_active()
    # immediate postcopy: every page dirty and every block discarded ahead of READY_PING (its PONG
    # says the destination carried the discards out), long before the guest's stop
    setup = _writes(s.log)
    discard = wire.encode(wire.PostcopyRamDiscard(idstr=BLOCK, ranges=((0, BLOCK_LEN),)))
    assert MarkAllDirty() in s.log
    assert discard in setup and setup.index(discard) < setup.index(READY_PING_BYTES)
    acts = s.feed(StartPostcopy())
    assert StopGuest() in acts and StartBulk() in acts
    assert MarkAllDirty() not in acts
    data = _writes(acts)
    assert discard not in data
    assert wire.encode(wire.PostcopyRun()) in data
    return s, S.ACTIVE, acts


def active_round(preempt: bool):
    s = Src(preempt=preempt, precopy=SwitchoverPolicy(drain_mode="discard", mode="time", max_seconds=5.0)).to_precopy()
    s.now += 0.5
    acts = s.feed(RoundFinished(bytes=BLOCK_LEN + ODD_LEN))
    assert acts == [ScanDirty(), StartRound(1)]     # the scan's answer came back before StartRound
    assert s.s.precopy is not None and s.s.precopy.rounds[-1].dirty_pages == s.dirty_found
    return s, S.ACTIVE, acts


def active_run_after_precopy(preempt: bool):
    s = Src(preempt=preempt, precopy=SwitchoverPolicy(drain_mode="discard", mode="time", max_seconds=1.0)).to_precopy()
    acts = s.fire_timer()                   # the deadline cuts the round short
    assert acts == [EndRound()]
    acts = s.feed(RoundFinished(bytes=4096, ended=True))
    # guest running: scan, discards, the drain PING (answered at once by the driver); then the stop
    assert [a for a in acts[:4] if not isinstance(a, Write)] == [ScanDirty(), SendDiscards(before_stop=True), StopGuest()]
    assert acts[4:6] == [ScanDirty(), SendDiscards(max_ranges=512)] and StopTracking() in acts
    data = _writes(acts)
    assert wire.encode(wire.PostcopyRun()) in data
    assert b"pc.ram" not in data.split(wire.encode(wire.Ping(value=2)))[0], "no whole-block discard after precopy"
    assert not of_type(acts, MarkAllDirty)          # only what is dirty goes again
    assert StartBulk() in acts
    st = s.s.precopy_stats(s.now)
    assert st is not None and st.discard_ranges == 2 * s.discard_ranges and st.dirty_pages_at_switch == s.dirty_found
    assert st.drain == "pong"
    assert st.switch_reason == "time" and st.rounds == 1
    return s, S.ACTIVE, acts


# -- postcopy -------------------------------------------------------------------------------------


def pa_link_broken_channel_failed(preempt: bool):
    s = Src(preempt=preempt).to_postcopy_active()
    acts = s.feed(ChannelFailed("return path closed"))
    assert BreakLink() in acts and CloseChannels() in acts
    assert s.s.retry_at is not None
    return s, S.POSTCOPY_ACTIVE, acts


def pa_link_broken_pong_timeout(preempt: bool):
    s = Src(preempt=preempt, link_timeout=2.0).to_postcopy_active()
    s.advance(1.5)
    assert s.s.status is S.POSTCOPY_ACTIVE
    acts = s.advance(1.0)
    assert BreakLink() in acts
    assert "PONG" in s.s.last_pause_reason
    return s, S.POSTCOPY_ACTIVE, acts


def pa_link_broken_no_shut(preempt: bool):
    s = Src(preempt=preempt, link_timeout=1.0).to_postcopy_active()
    end = s.feed(BulkFinished())
    assert wire.encode(wire.EndOfStream()) in _writes(end)
    if preempt:
        assert Write(Channel.PREEMPT, (0x10).to_bytes(8, "big"), last=True) in end
    acts = s.fire_timer()
    assert "SHUT" in s.s.last_pause_reason
    return s, S.POSTCOPY_ACTIVE, acts


def pa_link_broken_pause_requested(preempt: bool):
    s = Src(preempt=preempt).to_postcopy_active()
    acts = s.feed(PauseRequested())
    assert s.s.retry_at is None                 # migrate-pause: wait for the operator's resume
    return s, S.POSTCOPY_ACTIVE, acts


def paused_recovery_started(preempt: bool):
    s = Src(preempt=preempt).to_paused()
    acts = s.fire_timer()
    assert Connect(Channel.MAIN) in acts
    want = _encode([wire.RecvBitmapRequest(idstr=BLOCK), wire.RecvBitmapRequest(idstr=ODD_BLOCK)])
    assert Write(Channel.MAIN, want) in acts
    if preempt:
        assert acts.index(Write(Channel.MAIN, want)) < acts.index(Connect(Channel.PREEMPT))
    assert StartReturnPath() in acts
    assert s.s.recovery.handshake
    return s, S.POSTCOPY_PAUSED, acts


def paused_recovery_started_by_resume(preempt: bool):
    s = Src(preempt=preempt).to_postcopy_active()
    s.feed(PauseRequested())
    assert s.s.get_timer() == pytest.approx(s.s.recover_deadline)
    acts = s.feed(ResumeRequested())
    assert Connect(Channel.MAIN) in acts
    return s, S.POSTCOPY_PAUSED, acts


def recover_resumed(preempt: bool):
    s = Src(preempt=preempt).to_recover()
    acts = s.good_bitmaps()
    assert [a.block_index for a in of_type(acts, ReloadDirty)] == [0, 1]
    assert Write(Channel.MAIN, _encode([wire.PostcopyResume()])) in acts
    assert s.s.status is S.POSTCOPY_RECOVER
    acts += s.rp(wire.ResumeAck(value=1))
    assert StartBulk() in acts
    assert s.s.recoveries == 1 and s.s.restarts == 0
    return s, S.POSTCOPY_RECOVER, acts


def test_preempt_requests_ping() -> None:
    """With a preempt channel the source says it reads page requests there too: PREEMPT_REQUESTS_PING
    right before READY_PING, and again right before RESUME in a recovery (a new connection);
    without one it never says so (requests only ever come on the return path then)."""
    requests_ping = Write(Channel.MAIN, _encode([wire.Ping(value=PREEMPT_REQUESTS_PING)]))
    ready = Write(Channel.MAIN, _encode([wire.Ping(value=READY_PING)]))
    for preempt in (True, False):
        s = Src(preempt=preempt, answer_ready=False)
        acts = s.start()
        assert ready in acts
        if preempt:
            assert acts.index(requests_ping) == acts.index(ready) - 1
            assert acts.index(Connect(Channel.PREEMPT)) < acts.index(requests_ping)   # both channels up
        else:
            assert requests_ping not in acts
        s = Src(preempt=preempt).to_recover()
        acts = s.good_bitmaps()
        resume = Write(Channel.MAIN, _encode([wire.PostcopyResume()]))
        assert resume in acts
        if preempt:
            assert acts.index(requests_ping) == acts.index(resume) - 1
        else:
            assert requests_ping not in acts


def _bad_bitmap(preempt: bool, body: bytes, idstr: str = ODD_BLOCK):
    s = Src(preempt=preempt).to_recover()
    before = len(s.s.recovery_errors)
    acts = s.rp(wire.RecvBitmap(idstr=idstr, bitmap=body))
    assert not of_type(acts, ReloadDirty)
    _attempt_failed_checks(s, acts, before)
    return s, S.POSTCOPY_RECOVER, acts


def recover_failed_bitmap_too_short(preempt: bool):
    return _bad_bitmap(preempt, b"\xff" * 8)


def recover_failed_bitmap_too_long(preempt: bool):
    return _bad_bitmap(preempt, bitmap(BLOCK_LEN // 4096, words=5), BLOCK)


def recover_failed_bitmap_padding(preempt: bool):
    """100 pages: bits 100..127 of the last word are padding and must be clear."""
    return _bad_bitmap(preempt, bitmap(ODD_LEN // 4096, extra_bits=1 << 100))


def recover_failed_bitmap_twice(preempt: bool):
    s = Src(preempt=preempt).to_recover()
    s.rp(wire.RecvBitmap(idstr=BLOCK, bitmap=bitmap(BLOCK_LEN // 4096)))
    acts = s.rp(wire.RecvBitmap(idstr=BLOCK, bitmap=bitmap(BLOCK_LEN // 4096)))
    _attempt_failed_checks(s, acts, 0)
    return s, S.POSTCOPY_RECOVER, acts


def recover_failed_unknown_bitmap(preempt: bool):
    return _bad_bitmap(preempt, bitmap(8), "nope.ram")


def recover_failed_handshake_deadline(preempt: bool):
    s = Src(preempt=preempt, link_timeout=2.0).to_recover()
    assert s.s.get_timer() == pytest.approx(s.now + 2.0)
    acts = s.fire_timer()
    _attempt_failed_checks(s, acts, 0)
    return s, S.POSTCOPY_RECOVER, acts


def recover_failed_channel(preempt: bool):
    s = Src(preempt=preempt).to_recover()
    acts = s.feed(ChannelFailed("return path closed"))
    _attempt_failed_checks(s, acts, 0)
    return s, S.POSTCOPY_RECOVER, acts


def recover_failed_early_ack(preempt: bool):
    s = Src(preempt=preempt).to_recover()
    acts = s.rp(wire.ResumeAck(value=1))          # before RESUME was sent
    _attempt_failed_checks(s, acts, 0)
    return s, S.POSTCOPY_RECOVER, acts


def recover_failed_preempt_connect(preempt: bool):
    s = Src(preempt=True).to_paused()
    s.now = s.s.get_timer()
    assert s.s.handle_timer(s.now) == [Connect(Channel.MAIN)]      # answered by hand from here
    acts = s.s.handle(Connected(Channel.MAIN), s.now)
    assert acts[-1] == Connect(Channel.PREEMPT) and s.s.status is S.POSTCOPY_RECOVER
    acts = s.feed(ConnectFailed(Channel.PREEMPT, "refused"))
    _attempt_failed_checks(s, acts, 0)
    return s, S.POSTCOPY_RECOVER, acts


def recover_link_broken_pause(preempt: bool):
    s = Src(preempt=preempt).to_recover()
    acts = s.feed(PauseRequested())
    assert BreakLink() in acts and s.s.retry_at is None
    return s, S.POSTCOPY_RECOVER, acts


def recover_start_over(preempt: bool):
    """SHUT 2 in the recovery handshake: no guest ran there; the whole stream again, guest still stopped."""
    s = Src(preempt=preempt).to_recover()
    switch = s.s.switch_events
    acts = s.rp(wire.Shut(value=2))
    assert acts.index(CloseChannels()) < acts.index(Connect(Channel.MAIN))
    assert MarkAllDirty() in acts
    data = _writes(acts)
    assert data == _encode(s.s.preamble()) + _encode(switch)
    assert not of_type(acts, StopGuest)
    assert StartBulk() in acts
    assert s.s.restarts == 1 and s.s.recoveries == 0
    assert s.s.recover_deadline is None
    return s, S.POSTCOPY_RECOVER, acts


def paused_start_over(preempt: bool):
    """SHUT 2, then the reconnection fails: paused, still to start over; the next retry does."""
    s = Src(preempt=preempt).to_recover()
    s.connect_ok = False
    first = s.rp(wire.Shut(value=2))
    assert s.s.status is S.POSTCOPY_PAUSED and s.s.recovery.starting_over
    assert transitions_of(first) == [S.POSTCOPY_PAUSED]
    s.connect_ok = True
    acts = s.fire_timer()
    assert MarkAllDirty() in acts and wire.encode(wire.PostcopyRun()) in _writes(acts)
    assert s.s.restarts == 1
    return s, S.POSTCOPY_PAUSED, acts


def pa_completed(preempt: bool):
    s = Src(preempt=preempt).to_postcopy_active()
    s.feed(BulkFinished())
    acts = s.rp(wire.Shut(value=0))
    assert CloseChannels() in acts and Finish(None) in acts
    assert s.s.get_timer() is None
    return s, S.POSTCOPY_ACTIVE, acts


# -- failures ---------------------------------------------------------------------------------------


def setup_failed_connect(preempt: bool):
    s = Src(preempt=preempt, connect_ok=False)
    acts = s.start()
    _failed_kind(s, acts, "connect")
    return s, S.SETUP, acts


def setup_failed_connect_deadline(preempt: bool):
    s = Src(preempt=preempt).to_setup()
    s.connect_ok = False
    s.now = 2.0                     # past connect_timeout
    acts = s.fire_timer()
    _failed_kind(s, acts, "connect")
    return s, S.SETUP, acts


def active_failed_io(preempt: bool):
    s = Src(preempt=preempt).to_active()
    acts = s.feed(ChannelFailed("write failed"))
    _failed_kind(s, acts, "io")
    return s, S.ACTIVE, acts


def pa_failed_destination(preempt: bool):
    s = Src(preempt=preempt).to_postcopy_active()
    acts = s.rp(wire.Shut(value=1))
    _failed_kind(s, acts, "destination_failed")
    return s, S.POSTCOPY_ACTIVE, acts


def paused_failed_recover_timeout(preempt: bool):
    s = Src(preempt=preempt, recover_timeout=10.0).to_paused()
    s.connect_ok = False            # every retry fails: paused throughout
    paused_at = s.now
    while s.s.status is S.POSTCOPY_PAUSED:
        acts = s.fire_timer()
    assert s.now == pytest.approx(paused_at + 10.0)
    assert len(s.s.recovery_errors) > 3
    _failed_kind(s, acts, "recovery_timeout")
    return s, S.POSTCOPY_PAUSED, acts


def recover_failed_recover_timeout(preempt: bool):
    s = Src(preempt=preempt, recover_timeout=10.0, link_timeout=5.0).to_paused()
    s.now = 9.0
    s.s.retry_at = None
    s.feed(ResumeRequested())
    assert s.s.status is S.POSTCOPY_RECOVER
    acts = s.fire_timer()
    assert s.now == pytest.approx(10.0)
    _failed_kind(s, acts, "recovery_timeout")
    return s, S.POSTCOPY_RECOVER, acts


SCENARIOS: dict[tuple[S, T], list[Scenario]] = {
    (S.NONE, T.START): [none_start],
    (S.SETUP, T.STREAM_STARTED): [setup_stream_started],
    (S.ACTIVE, T.RUN): [active_run, active_run_after_precopy],
    (S.ACTIVE, T.ROUND): [active_round],
    (S.POSTCOPY_ACTIVE, T.LINK_BROKEN): [pa_link_broken_channel_failed, pa_link_broken_pong_timeout,
                                         pa_link_broken_no_shut, pa_link_broken_pause_requested],
    (S.POSTCOPY_PAUSED, T.RECOVERY_STARTED): [paused_recovery_started, paused_recovery_started_by_resume],
    (S.POSTCOPY_RECOVER, T.RECOVERY_FAILED): [recover_failed_bitmap_too_short, recover_failed_bitmap_too_long,
                                              recover_failed_bitmap_padding, recover_failed_bitmap_twice,
                                              recover_failed_unknown_bitmap, recover_failed_handshake_deadline,
                                              recover_failed_channel, recover_failed_early_ack,
                                              recover_failed_preempt_connect],
    (S.POSTCOPY_RECOVER, T.LINK_BROKEN): [recover_link_broken_pause],
    (S.POSTCOPY_RECOVER, T.RESUMED): [recover_resumed],
    (S.POSTCOPY_RECOVER, T.START_OVER): [recover_start_over],
    (S.POSTCOPY_PAUSED, T.START_OVER): [paused_start_over],
    (S.POSTCOPY_ACTIVE, T.COMPLETED): [pa_completed],
    (S.SETUP, T.FAILED): [setup_failed_connect, setup_failed_connect_deadline],
    (S.ACTIVE, T.FAILED): [active_failed_io],
    (S.POSTCOPY_ACTIVE, T.FAILED): [pa_failed_destination],
    (S.POSTCOPY_PAUSED, T.FAILED): [paused_failed_recover_timeout],
    (S.POSTCOPY_RECOVER, T.FAILED): [recover_failed_recover_timeout],
}

#: Rows no input sequence reaches: the source can't fail before start() (no input means anything then).
UNREACHABLE = {(S.NONE, T.FAILED)}

#: Scenarios about the preempt channel itself.
PREEMPT_ONLY = {'recover_failed_preempt_connect'}

CASES = [pytest.param(row, sc, preempt, id=f"{row[0].value}-{row[1].value}-{sc.__name__}-{'preempt' if preempt else 'plain'}")
         for row, scs in SCENARIOS.items() for sc in scs for preempt in (False, True)
         if preempt or sc.__name__ not in PREEMPT_ONLY]


def test_every_row_has_a_scenario() -> None:
    assert set(SCENARIOS) | UNREACHABLE == set(SOURCE_TRANSITIONS)


@pytest.mark.parametrize(("row", "scenario", "preempt"), CASES)
def test_transition(row: tuple[S, T], scenario: Scenario, preempt: bool) -> None:
    s, before, acts = scenario(preempt)
    assert before is row[0]
    target = SOURCE_TRANSITIONS[row]
    if target is not before:
        assert StatusChanged(target) in acts
    else:
        assert not of_type(acts, StatusChanged)     # a precopy round: still active
    assert s.s.status is target


# -- further behaviour ---------------------------------------------------------------------------


def test_nothing_before_start_is_acted_on() -> None:
    s = Src(preempt=False)
    for event in (ChannelFailed("x"), BulkFinished(), PauseRequested(), ResumeRequested(), StartPostcopy()):
        assert s.s.handle(event, 0.0) == []
    assert s.s.status is S.NONE


def test_recovery_retries_back_off() -> None:
    s = Src(preempt=False).to_paused()
    s.connect_ok = False
    times = []
    for _ in range(5):
        times.append(s.s.get_timer())
        s.fire_timer()
    gaps = [round(b - a, 6) for a, b in zip(times, times[1:], strict=False)]
    assert gaps == [0.02, 0.02, 0.02, 0.02]      # backoff (0.01, 0.02): doubled, capped
    assert s.s.status is S.POSTCOPY_PAUSED


def test_heartbeat_pong_keeps_the_link() -> None:
    s = Src(preempt=False, link_timeout=2.0).to_postcopy_active()
    for _ in range(5):
        s.now += 1.5
        s.rp(wire.Pong(value=0x50430007))
        assert s.s.handle_timer(s.now) == []
    assert s.s.status is S.POSTCOPY_ACTIVE


def test_downtime_runs_to_pong_3() -> None:
    s = Src(preempt=False, answer_switch=False).to_postcopy_active()
    s.now += 0.25
    s.rp(wire.Pong(value=3))
    assert s.s.downtime == pytest.approx(0.25)


@pytest.mark.parametrize("preempt", [False, True], ids=["plain", "preempt"])
def test_background_stream_waits_for_pong_3(preempt: bool) -> None:
    """From PACKAGED to PONG 3 the destination's switch runs alone: the stream starts at PONG 3."""
    s = Src(preempt=preempt, answer_switch=False).to_active()
    acts = s.feed(StartPostcopy())
    assert StopGuest() in acts and wire.encode(wire.PostcopyRun()) in _writes(acts)
    assert StartBulk() not in acts and s.s.status is S.POSTCOPY_ACTIVE
    s.now += 0.001
    assert s.rp(wire.Pong(value=2)) == []       # PING 2's answer is not the destination at RUN
    assert s.rp(wire.Pong(value=3)) == [StartBulk()]
    assert s.s.downtime == pytest.approx(0.001)
    assert s.s.bulk_held_until is None
    assert s.rp(wire.Pong(value=3)) == []       # once


def test_background_stream_starts_without_pong_3_after_the_hold() -> None:
    s = Src(preempt=True, answer_switch=False).to_active()
    switched = s.now
    assert StartBulk() not in s.feed(StartPostcopy())
    assert s.s.get_timer() == pytest.approx(switched + BULK_HOLD_SECONDS)
    assert s.fire_timer() == [StartBulk()]
    assert s.rp(wire.Pong(value=3)) == []       # late: the downtime is measured, nothing starts twice
    assert s.s.downtime == pytest.approx(BULK_HOLD_SECONDS)


def test_a_cut_while_the_stream_is_held_starts_it_with_the_recovery() -> None:
    s = Src(preempt=True, answer_switch=False).to_active()
    s.feed(StartPostcopy())
    acts = s.feed(ChannelFailed("cut in the switch"))
    assert s.s.status is S.POSTCOPY_PAUSED and StartBulk() not in acts
    assert s.s.bulk_held_until is None


def test_shut_2_outside_the_handshake_fails() -> None:
    s = Src(preempt=False).to_postcopy_active()
    acts = s.rp(wire.Shut(value=2))
    _failed_kind(s, acts, "destination_failed")


def test_no_actions_after_finish() -> None:
    s = Src(preempt=False).to_postcopy_active()
    s.rp(wire.Shut(value=1))
    assert s.s.handle_timer(s.now + 1000) == []
    assert s.s.handle(ChannelFailed("x"), s.now) == []


def test_never_encodes_a_command_the_peer_may_not_know() -> None:
    """The machine type sent says how new the destination is at least: a 7.2 machine's peer gets
    nothing newer than 7.2 knows (MIG_CMD_SWITCHOVER_START is 10.0+), a 10.0 machine's may."""
    from postcopy.wire import LocalProtocolError

    old = SourceSession(source_blocks(), wire.Configuration(machine_type="pc-i440fx-7.2"), preempt=False)
    assert old.peer.version == (7, 2)
    with pytest.raises(LocalProtocolError, match="SWITCHOVER_START"):
        old._encode([wire.SwitchoverStart()])
    assert old._encode(old.preamble())      # everything the source sends, 7.2 knows
    new = SourceSession(source_blocks(), wire.Configuration(machine_type="pc-q35-10.0"), preempt=False)
    assert new._encode([wire.SwitchoverStart()]) == wire.encode(wire.SwitchoverStart())


# -- the switch waits for a ready destination, not inside the downtime ------------------------------


def test_guest_stops_only_once_the_destination_answered_ready() -> None:
    """READY_PING goes once both channels are up; the guest stops on its PONG, not before: a
    destination still taking in the RAM setup would otherwise spend the downtime on it."""
    s = Src(preempt=True, answer_ready=False)
    acts = s.start()
    ready = wire.encode(wire.Ping(value=READY_PING))
    # immediate postcopy: every page marked dirty and every block discarded ahead of READY_PING
    # (its PONG says they are carried out), not inside the downtime nor beside the stop
    discards = _encode([wire.PostcopyRamDiscard(idstr=b.idstr, ranges=((0, b.used_length),))
                        for b in source_blocks()])
    # (with preempt, PREEMPT_REQUESTS_PING right before it: see test_preempt_requests_ping)
    requests_ping = wire.encode(wire.Ping(value=PREEMPT_REQUESTS_PING))
    assert _writes(acts).endswith(discards + requests_ping + ready)
    assert _writes(acts).index(ready) > len(_encode(s.s.preamble())) - 1
    assert acts.index(MarkAllDirty()) < acts.index(Write(Channel.MAIN, discards))
    assert not of_type(acts, StopGuest) and s.s.status is S.ACTIVE
    assert s.s.get_timer() == pytest.approx(s.now + s.link_timeout)
    s.now += 0.01
    acts = s.rp(wire.Pong(value=READY_PING))
    # after the stop only PING 2, PACKAGED (devices, RUN), PING 4
    assert acts[0] == StopGuest()
    after = _writes(acts[1:])
    assert after.startswith(wire.encode(wire.Ping(value=2))) and wire.encode(wire.PostcopyRun()) in after
    assert b"pc.ram" not in after
    assert not of_type(acts, MarkAllDirty)
    assert s.s.status is S.POSTCOPY_ACTIVE and s.s.stopped_at == pytest.approx(0.01)
    assert s.s.discard_ranges == len(source_blocks())
    assert _encode(s.s.switch_events).startswith(discards)      # a start-over sends them again


def test_a_destination_that_never_answers_ready_gets_one_link_timeout() -> None:
    s = Src(preempt=False, answer_ready=False, link_timeout=2.0)
    s.start()
    assert not of_type(s.log, StopGuest)
    acts = s.fire_timer()
    assert s.now == pytest.approx(2.0)
    assert StopGuest() in acts and s.s.status is S.POSTCOPY_ACTIVE
    assert s.rp(wire.Pong(value=READY_PING)) == []     # a late PONG changes nothing


def test_ready_before_start_postcopy_switches_at_once_on_request() -> None:
    s = Src(preempt=True, hold_switchover=True)
    acts = s.start()
    assert s.s.peer_ready and not of_type(acts, StopGuest)       # held until StartPostcopy
    acts = s.feed(StartPostcopy())
    assert acts[0] == StopGuest()       # the discards went ahead of READY_PING


def test_precopy_switch_waits_for_ready_too_and_marks_nothing() -> None:
    # without the drain, so that READY is the only thing the stop waits for
    s = Src(preempt=False, answer_ready=False,
            precopy=SwitchoverPolicy(mode="time", max_seconds=1.0, drain_seconds=0.0))
    s.start()
    s.feed(StartPostcopy())
    acts = s.feed(RoundFinished(bytes=4096, ended=True))
    assert not of_type(acts, StopGuest)          # the round ended, the destination has not answered
    acts = s.rp(wire.Pong(value=READY_PING))
    assert StopGuest() in acts and not of_type(acts, MarkAllDirty)


def test_precopy_drain_starts_only_once_the_destination_is_ready() -> None:
    s = Src(preempt=False, answer_ready=False, precopy=SwitchoverPolicy(mode="time", max_seconds=1.0))
    s.start()
    s.feed(StartPostcopy())
    acts = s.feed(RoundFinished(bytes=4096, ended=True))
    assert not of_type(acts, ScanDirty) and not of_type(acts, StopGuest)
    acts = s.rp(wire.Pong(value=READY_PING))
    assert of_type(acts, ScanDirty) and not of_type(acts, StopGuest) and not of_type(acts, MarkAllDirty)
