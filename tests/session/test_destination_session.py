"""DestinationSession, one transition of DESTINATION_TRANSITIONS at a time (preempt on and off).

Each scenario drives the session to the row's start status with a realistic
input sequence, feeds the trigger, and returns what it needs checked: the
generic checks (new status, a StatusChanged to it) are done by the test, the
key actions by the scenario.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from session_drivers import (
    BLOCK,
    CONFIG,
    DEVICE,
    OTHER_HOST,
    SRC_HOST,
    Dest,
    of_type,
    preamble_items,
    switch_items,
    transitions_of,
)

from postcopy import wire
from postcopy.session._destination import HEARTBEAT_PING, PREEMPT_REQUESTS_PING
from postcopy.session import (
    DESTINATION_TRANSITIONS,
    PREEMPT_SILENCE_SECONDS,
    SHUT_NOTHING_TO_RECOVER,
    AcceptPreempt,
    AnswerBitmapRequest,
    AttachReturnPath,
    BreakLink,
    ChannelEnded,
    CheckComplete,
    CloseConnection,
    ConnectionAccepted,
    ConnectionClosed,
    DataPathFailed,
    Finish,
    CollectConnections,
    HoldStream,
    MigrationStatus,
    PauseRequested,
    ReceivePages,
    ReceiveStream,
    RecoverRequested,
    RegisterMemory,
    ResendRequests,
    PrepareMemory,
    ResetBeforeRun,
    ResumeStream,
    Send,
    SendReturnPath,
    StartGuest,
    StartPreemptReceiver,
    StatusChanged,
    StreamItem,
    Trigger,
)

S = MigrationStatus
T = Trigger

Scenario = Callable[[bool], tuple[Dest, S, list]]


def _failed_kind(d: Dest, acts: list, kind: str) -> None:
    fin = of_type(acts, Finish)
    assert len(fin) == 1 and fin[0].error is not None and fin[0].error.kind == kind, fin
    assert d.s.error is not None and d.s.error.kind == kind


# -- NONE, SETUP, ACTIVE ---------------------------------------------------------------------


def none_start(preempt: bool):
    d = Dest(preempt=preempt)
    return d, d.s.status, d.start()


def setup_stream_started(preempt: bool):
    d = Dest(preempt=preempt).to_setup_with_main()
    acts = d.items(d.main, [wire.StreamHeader()])
    return d, S.SETUP, acts


def setup_start_over_bad_stream(preempt: bool):
    """A malformed stream before RUN (a stranger, or garbage after a header) is dropped and
    counted; the destination listens on for the real source."""
    d = Dest(preempt=preempt).to_setup_with_main()
    acts = d.feed(DataPathFailed("bad_magic", "not a QEMU stream", d.main))
    assert of_type(acts, ResetBeforeRun)
    assert CloseConnection(d.main) in acts
    assert d.s.refused["malformed"] == 1
    assert not of_type(acts, Finish)
    return d, S.SETUP, acts


def setup_start_over_main_closed(preempt: bool):
    """The main channel closed before its header was even decoded: the stream is awaited again."""
    d = Dest(preempt=preempt).to_setup_with_main()
    acts = d.feed(ConnectionClosed(d.main, "reset"))
    assert of_type(acts, ResetBeforeRun) == [ResetBeforeRun()]
    assert CloseConnection(d.main) in acts
    assert d.s.restarts == 1
    return d, S.SETUP, acts


def test_a_newer_stream_replaces_the_attempt_once_it_shows_its_ram_setup() -> None:
    for preempt in (False, True):
        setup_start_over_newer_stream(preempt)


def setup_start_over_newer_stream(preempt: bool):
    """A second fresh stream replaces the first one (its source gave up on it), but only
    once its complete RAM setup shows it is a source: until then it disturbs nothing."""
    d = Dest(preempt=preempt).to_setup_with_main()
    old = d.main
    d.main, acts = d.connect(b"Q")
    assert acts == [ReceiveStream(d.main, recovery=False)]
    setup = preamble_items()
    until_setup = setup[: next(i for i, e in enumerate(setup) if isinstance(e, wire.RamSetup)) + 1]
    assert d.items(d.main, until_setup[:-1]) == []          # a candidate: nothing answered yet
    acts = d.items(d.main, until_setup[-1:])
    assert of_type(acts, ResetBeforeRun)
    assert CloseConnection(old) in acts
    assert of_type(acts, PrepareMemory)                      # its earlier items replayed in order
    assert not of_type(acts, ReceiveStream)                  # its reader runs already: never a second one
    assert d.s.restarts == 1
    assert d.s.refused["replaced"] == 1
    d.items(d.main, setup[len(until_setup):])
    return d, S.ACTIVE, acts


def test_the_replaced_streams_late_failure_does_not_touch_the_new_one() -> None:
    """The replaced stream's reader sees its close as a truncated stream: that stream is
    gone already, and the new one goes on (it once started over again and lost its source)."""
    d, _, _ = setup_start_over_newer_stream(preempt=True)
    restarts = d.s.restarts
    old = next(a.conn for a in d.log if isinstance(a, CloseConnection))
    assert d.feed(DataPathFailed("truncated", "stream ends 1 bytes into an incomplete stream header", old)) == []
    assert d.s.restarts == restarts and d.s.status is S.ACTIVE and d.s.attempt.main == d.main


def active_start_over_main_closed(preempt: bool):
    """Pause before RUN: the main channel closes -> start over (no guest runs here yet)."""
    d = Dest(preempt=preempt).to_active()
    acts = d.feed(ConnectionClosed(d.main, "reset"))
    assert of_type(acts, ResetBeforeRun) == [ResetBeforeRun()]
    assert CloseConnection(d.main) in acts
    if preempt:
        assert CloseConnection(d.pre) in acts
    assert d.s.restarts == 1
    assert d.s.layout is None
    return d, S.ACTIVE, acts


def active_start_over_eof_item(preempt: bool):
    d = Dest(preempt=preempt).to_active()
    acts = d.items(d.main, [wire.ConnectionClosed(complete=False)])
    assert of_type(acts, ResetBeforeRun) and d.s.restarts == 1
    return d, S.ACTIVE, acts


def active_start_over_preempt_closed(preempt: bool):
    d = Dest(preempt=preempt).to_active()
    acts = d.feed(ConnectionClosed(d.pre, "reset"))
    assert of_type(acts, ResetBeforeRun) and CloseConnection(d.main) in acts and d.s.restarts == 1
    return d, S.ACTIVE, acts


def active_run(preempt: bool):
    d = Dest(preempt=preempt).to_active()
    acts = d.items(d.main, switch_items())
    assert RegisterMemory() in acts
    assert StartGuest((switch_items()[-1].events[1],), CONFIG, (True,)) in acts
    assert ReceivePages(d.main, silence_breaks=False) in acts
    # PONG 3 after the guest's start: the source's downtime ends when the guest runs here
    pong3 = acts.index(SendReturnPath(wire.encode(wire.Pong(value=3))))
    assert pong3 == acts.index(StartGuest((switch_items()[-1].events[1],), CONFIG, (True,))) + 1
    if preempt:
        assert StartPreemptReceiver(d.pre) in acts
        assert not of_type(acts, HoldStream)
    return d, S.ACTIVE, acts


# -- after RUN ---------------------------------------------------------------------------------


def _paused_checks(d: Dest, acts: list, conns: list[int]) -> None:
    assert AttachReturnPath(None) in acts and BreakLink() in acts
    i_attach = acts.index(AttachReturnPath(None))
    i_status = acts.index(StatusChanged(S.POSTCOPY_PAUSED))
    assert i_attach < i_status
    for c in conns:
        assert CloseConnection(c) in acts
    assert not of_type(acts, ResetBeforeRun)
    assert d.s.restarts == 0


def pa_link_broken_main_closed(preempt: bool):
    """Pause after RUN: the main channel closes -> postcopy-paused, page requests kept outstanding."""
    d = Dest(preempt=preempt).to_postcopy_active()
    acts = d.feed(ConnectionClosed(d.main, "reset"))
    _paused_checks(d, acts, [d.main] + ([d.pre] if preempt else []))
    return d, S.POSTCOPY_ACTIVE, acts


def pa_link_broken_eof_item(preempt: bool):
    d = Dest(preempt=preempt).to_postcopy_active()
    acts = d.items(d.main, [wire.ConnectionClosed(complete=False)])
    _paused_checks(d, acts, [d.main])
    return d, S.POSTCOPY_ACTIVE, acts


def pa_link_broken_preempt_closed(preempt: bool):
    d = Dest(preempt=preempt).to_postcopy_active()
    acts = d.feed(ConnectionClosed(d.pre, "preempt channel closed without EOS"))
    _paused_checks(d, acts, [d.main, d.pre])
    return d, S.POSTCOPY_ACTIVE, acts


def pa_link_broken_pause_requested(preempt: bool):
    d = Dest(preempt=preempt).to_postcopy_active()
    acts = d.feed(PauseRequested())
    _paused_checks(d, acts, [d.main])
    assert d.s.last_break_reason == "paused by request"
    return d, S.POSTCOPY_ACTIVE, acts


def active_completed_in_precopy(preempt: bool):
    """QEMU finished in precopy (it converged before migrate-start-postcopy): device state and EOF
    with no LISTEN or RUN. The guest starts on what was written, then SHUT 0."""
    d = Dest(preempt=preempt).to_active()
    acts = d.items(d.main, [DEVICE, wire.EndOfStream()])
    starts = of_type(acts, StartGuest)
    assert len(starts) == 1
    assert starts[0].device_sections == (DEVICE,)
    assert not of_type(acts, RegisterMemory)
    assert SendReturnPath(wire.encode(wire.Shut(value=0))) in acts
    assert acts[-1] == Finish(None)
    assert d.s.precopy_only
    return d, S.ACTIVE, acts


def test_a_precopy_finish_with_pages_missing_fails() -> None:
    d = Dest(preempt=False, missing=3).to_active()
    acts = d.items(d.main, [DEVICE, wire.EndOfStream()])
    _failed_kind(d, acts, "incomplete")


def pa_completed(preempt: bool):
    d = Dest(preempt=preempt).to_postcopy_active()
    acts = d.items(d.main, [wire.EndOfStream()])
    if preempt:
        assert not of_type(acts, CheckComplete)         # the preempt channel's EOS is still due
        acts += d.feed(ChannelEnded(d.pre))
    assert CheckComplete() in acts
    assert SendReturnPath(wire.encode(wire.Shut(value=0))) in acts
    assert Finish(None) in acts
    return d, S.POSTCOPY_ACTIVE, acts


def paused_recovery_started(preempt: bool):
    d = Dest(preempt=preempt).to_paused()
    conn, acts = d.connect(b"\x08")
    assert ReceiveStream(conn, recovery=True) in acts
    assert d.s.get_timer() is not None
    return d, S.POSTCOPY_PAUSED, acts


def pa_recovery_while_active(preempt: bool):
    """The source noticed the broken link first: its recovery arrives while postcopy-active
    here. It breaks the link only once it proves itself (a RECV_BITMAP for a known block)."""
    d = Dest(preempt=preempt).to_postcopy_active()
    conn, first = d.connect(b"\x08")
    assert first == [ReceiveStream(conn, recovery=True)]     # a candidate: the link stays up
    assert d.s.status is S.POSTCOPY_ACTIVE
    promoted = d.items(conn, [wire.RecvBitmapRequest(idstr=BLOCK)])
    assert not of_type(promoted, ReceiveStream)             # its reader runs already: never a second one
    acts = first + promoted
    assert AnswerBitmapRequest(conn, BLOCK) in acts
    assert transitions_of(acts) == [S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER]
    _paused_checks(d, acts, [d.main])
    assert ReceiveStream(conn, recovery=True) in acts
    return d, S.POSTCOPY_ACTIVE, acts


def recover_resumed(preempt: bool):
    d = Dest(preempt=preempt).to_recover()
    c = d.recovery_main
    acts = d.resume()
    assert AnswerBitmapRequest(c, BLOCK) in acts
    assert Send(c, wire.encode(wire.ResumeAck(value=1))) in acts
    i = acts.index(AttachReturnPath(c))
    assert ResendRequests() in acts[i:], "page requests outstanding from the pause are not sent again"
    assert ReceivePages(c, silence_breaks=False) in acts
    if preempt:
        assert StartPreemptReceiver(d.pre) in acts
    assert d.s.recoveries == 1
    assert d.s.get_timer() is None
    return d, S.POSTCOPY_RECOVER, acts


def recover_failed_handshake_deadline(preempt: bool):
    d = Dest(preempt=preempt, link_timeout=2.0).to_recover()
    t = d.s.get_timer()
    assert t == pytest.approx(d.now + 2.0, abs=0.02)
    acts = d.fire_timer()
    assert AttachReturnPath(None) in acts and CloseConnection(d.recovery_main) in acts
    assert d.s.get_timer() == pytest.approx(d.s.recover_deadline)
    return d, S.POSTCOPY_RECOVER, acts


def recover_failed_unknown_block(preempt: bool):
    d = Dest(preempt=preempt).to_recover()
    acts = d.items(d.recovery_main, [wire.RecvBitmapRequest(idstr="nope.ram")])
    assert CloseConnection(d.recovery_main) in acts
    return d, S.POSTCOPY_RECOVER, acts


def recover_failed_connection_closed(preempt: bool):
    d = Dest(preempt=preempt).to_recover()
    acts = d.feed(ConnectionClosed(d.recovery_main, "reset"))
    assert AttachReturnPath(None) in acts
    return d, S.POSTCOPY_RECOVER, acts


def recover_failed_unexpected_item(preempt: bool):
    d = Dest(preempt=preempt).to_recover()
    acts = d.items(d.recovery_main, [wire.PostcopyListen()])
    assert CloseConnection(d.recovery_main) in acts
    return d, S.POSTCOPY_RECOVER, acts


def recover_newer_recovery(preempt: bool):
    """A newer recovery replaces an abandoned one: paused, then recovering again on the new conn."""
    d = Dest(preempt=preempt).to_recover()
    old, old_pre = d.recovery_main, d.pre
    conn, acts = d.connect(b"\x08")
    assert transitions_of(acts) == [S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER]
    assert CloseConnection(old) in acts
    if preempt:
        assert CloseConnection(old_pre) in acts
    assert AttachReturnPath(None) in acts
    assert ReceiveStream(conn, recovery=True) in acts
    # the old attempt's items and close are stale now
    assert d.items(old, [wire.PostcopyResume()]) == []
    assert d.feed(ConnectionClosed(old, "reset")) == []
    d.recovery_main = conn
    if preempt:
        d.pre, _ = d.silent()
    done = d.resume()
    assert d.s.status is S.POSTCOPY_ACTIVE and ResendRequests() in done
    return d, S.POSTCOPY_RECOVER, acts


def recover_pause_requested(preempt: bool):
    """migrate-pause during postcopy-recover (QEMU allows it there too): the attempt is dropped.

    The table has (postcopy-recover, link_broken) for the destination, and the
    source pauses on PauseRequested in postcopy-recover; the destination should too.
    """
    d = Dest(preempt=preempt).to_recover()
    acts = d.feed(PauseRequested())
    assert AttachReturnPath(None) in acts
    assert CloseConnection(d.recovery_main) in acts
    return d, S.POSTCOPY_RECOVER, acts


# -- failures -----------------------------------------------------------------------------------


def none_failed(preempt: bool):
    d = Dest(preempt=preempt)
    acts = d.feed(DataPathFailed("uffd", "no userfaultfd"))
    _failed_kind(d, acts, "uffd")
    return d, S.NONE, acts


def setup_failed(preempt: bool):
    d = Dest(preempt=preempt, fail_fast=True).to_setup()
    acts = d.feed(DataPathFailed("weird", "something"))
    _failed_kind(d, acts, "placement")
    return d, S.SETUP, acts


def active_failed_advise(preempt: bool):
    d = Dest(preempt=preempt, fail_fast=True).to_setup_with_main()
    items = preamble_items()
    items = [wire.PostcopyAdvise(pagesize_summary=2 << 20, target_page_size=4096) if isinstance(e, wire.PostcopyAdvise)
             else e for e in items]
    acts = d.items(d.main, items)
    _failed_kind(d, acts, "advise_mismatch")
    assert BreakLink() in acts
    return d, S.ACTIVE, acts


def active_failed_bad_discard(preempt: bool):
    d = Dest(preempt=preempt, fail_fast=True).to_active()
    acts = d.items(d.main, [wire.PostcopyRamDiscard(idstr=BLOCK, ranges=((0, 2 << 20),))])
    _failed_kind(d, acts, "bad_discard")
    return d, S.ACTIVE, acts


def active_failed_preempt_mismatch(preempt: bool):
    """PACKAGED held for the preempt channel that never comes: failed after link_timeout."""
    d = Dest(preempt=True, link_timeout=2.0).to_setup_with_main()
    d.items(d.main, preamble_items())
    hold = d.items(d.main, switch_items())
    assert HoldStream(d.main) in hold and d.s.status is S.ACTIVE
    assert d.s.get_timer() == pytest.approx(d.now + 2.0)
    assert d.advance(1.0) == []
    acts = d.fire_timer()
    _failed_kind(d, acts, "preempt_mismatch")
    return d, S.ACTIVE, acts


def pa_failed_incomplete(preempt: bool):
    d = Dest(preempt=preempt).to_postcopy_active()
    d.missing = 7
    acts = d.items(d.main, [wire.EndOfStream()])
    if preempt:
        acts += d.feed(ChannelEnded(d.pre))
    _failed_kind(d, acts, "incomplete")
    return d, S.POSTCOPY_ACTIVE, acts


def pa_failed_unexpected(preempt: bool):
    d = Dest(preempt=preempt).to_postcopy_active()
    acts = d.items(d.main, [wire.PostcopyListen()])
    _failed_kind(d, acts, "unexpected")
    return d, S.POSTCOPY_ACTIVE, acts


def paused_failed_recover_timeout(preempt: bool):
    d = Dest(preempt=preempt, recover_timeout=30.0).to_paused()
    paused_at = d.now
    assert d.s.get_timer() == pytest.approx(paused_at + 30.0)
    assert d.advance(29.0) == []
    acts = d.fire_timer()
    _failed_kind(d, acts, "recovery_timeout")
    assert d.s.paused_total(d.now) == pytest.approx(30.0)
    return d, S.POSTCOPY_PAUSED, acts


def recover_failed_recover_timeout(preempt: bool):
    """The recovery deadline counts from the first pause, not from the attempt under way."""
    d = Dest(preempt=preempt, recover_timeout=30.0, link_timeout=5.0).to_paused()
    d.advance(28.0)
    d.recovery_main, _ = d.connect(b"\x08")
    assert d.s.status is S.POSTCOPY_RECOVER
    acts = d.fire_timer()
    assert d.now == pytest.approx(30.0, abs=0.1)
    _failed_kind(d, acts, "recovery_timeout")
    return d, S.POSTCOPY_RECOVER, acts


SCENARIOS: dict[tuple[S, T], list[Scenario]] = {
    (S.NONE, T.START): [none_start],
    (S.SETUP, T.STREAM_STARTED): [setup_stream_started],
    (S.ACTIVE, T.RUN): [active_run],
    (S.SETUP, T.START_OVER): [setup_start_over_main_closed, setup_start_over_bad_stream],
    (S.ACTIVE, T.START_OVER): [active_start_over_main_closed, active_start_over_eof_item,
                               active_start_over_preempt_closed],
    (S.POSTCOPY_ACTIVE, T.LINK_BROKEN): [pa_link_broken_main_closed, pa_link_broken_eof_item,
                                         pa_link_broken_preempt_closed, pa_link_broken_pause_requested,
                                         pa_recovery_while_active],
    (S.POSTCOPY_PAUSED, T.RECOVERY_STARTED): [paused_recovery_started],
    (S.POSTCOPY_RECOVER, T.RECOVERY_FAILED): [recover_failed_handshake_deadline, recover_failed_unknown_block,
                                              recover_failed_connection_closed, recover_failed_unexpected_item,
                                              recover_newer_recovery],
    (S.POSTCOPY_RECOVER, T.LINK_BROKEN): [recover_pause_requested],
    (S.POSTCOPY_RECOVER, T.RESUMED): [recover_resumed],
    (S.POSTCOPY_ACTIVE, T.COMPLETED): [pa_completed],
    (S.ACTIVE, T.COMPLETED): [active_completed_in_precopy],
    (S.NONE, T.FAILED): [none_failed],
    (S.SETUP, T.FAILED): [setup_failed],
    (S.ACTIVE, T.FAILED): [active_failed_advise, active_failed_bad_discard, active_failed_preempt_mismatch],
    (S.POSTCOPY_ACTIVE, T.FAILED): [pa_failed_incomplete, pa_failed_unexpected],
    (S.POSTCOPY_PAUSED, T.FAILED): [paused_failed_recover_timeout],
    (S.POSTCOPY_RECOVER, T.FAILED): [recover_failed_recover_timeout],
}

#: Scenarios about the preempt channel itself.
PREEMPT_ONLY = {'active_start_over_preempt_closed', 'pa_link_broken_preempt_closed', 'active_failed_preempt_mismatch'}

CASES = [pytest.param(row, sc, preempt, id=f"{row[0].value}-{row[1].value}-{sc.__name__}-{'preempt' if preempt else 'plain'}")
         for row, scs in SCENARIOS.items() for sc in scs for preempt in (False, True)
         if preempt or sc.__name__ not in PREEMPT_ONLY]


def test_every_row_has_a_scenario() -> None:
    assert set(SCENARIOS) == set(DESTINATION_TRANSITIONS)


@pytest.mark.parametrize(("row", "scenario", "preempt"), CASES)
def test_transition(row: tuple[S, T], scenario: Scenario, preempt: bool) -> None:
    d, before, acts = scenario(preempt)
    assert before is row[0]
    target = DESTINATION_TRANSITIONS[row]
    assert d.s.status is target or target in transitions_of(acts)
    assert StatusChanged(target) in acts
    if target is S.FAILED:
        assert d.s.status is S.FAILED
    if row[1] is not T.RECOVERY_FAILED and row != (S.POSTCOPY_ACTIVE, T.LINK_BROKEN):
        assert d.s.status is target


# -- further behaviour ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["setup", "active"])
def test_recovery_before_run_is_answered_shut_2(status: str) -> None:
    """A recovery connection (first byte 0x08) while no guest runs here: SHUT 2, close, nothing else."""
    d = Dest(preempt=False)
    d.to_setup() if status == "setup" else d.to_active()
    before = d.s.status
    conn, acts = d.connect(b"\x08")
    assert acts == [CloseConnection(conn, wire.encode(wire.Shut(value=SHUT_NOTHING_TO_RECOVER)))]
    assert d.s.status is before
    assert d.s.refused["nothing_to_recover"] == 1
    assert sum(d.s.refused.values()) == 1


def test_stale_preempt_channel_closing_is_ignored() -> None:
    """After a pause and a recovery, the old preempt channel's close must not break the new link."""
    d = Dest(preempt=True).to_recover()
    old_pre = d.log and [a.conn for a in d.log if isinstance(a, AcceptPreempt)][0]
    d.resume()
    assert d.s.status is S.POSTCOPY_ACTIVE
    assert old_pre != d.pre
    assert d.feed(ConnectionClosed(old_pre, "preempt channel stopped")) == []
    assert d.feed(ChannelEnded(old_pre)) == []
    assert d.s.status is S.POSTCOPY_ACTIVE
    # and the old main's leftovers are ignored as well
    assert d.feed(ConnectionClosed(d.main, "reset")) == []
    assert d.items(d.main, [wire.EndOfStream()]) == []


def test_stale_channel_before_run_is_ignored() -> None:
    d = Dest(preempt=True).to_active()
    old_main, old_pre = d.main, d.pre
    d.feed(ConnectionClosed(old_main, "reset"))        # start over
    assert d.feed(ConnectionClosed(old_pre, "reset")) == []
    assert d.items(old_main, [wire.StreamHeader()]) == []
    assert d.s.restarts == 1


def test_packaged_held_until_preempt_channel() -> None:
    d = Dest(preempt=True).to_setup_with_main()
    d.items(d.main, preamble_items())
    hold = d.items(d.main, switch_items())
    assert hold[-1] == HoldStream(d.main)
    assert d.s.status is S.ACTIVE and not of_type(hold, RegisterMemory)
    pre, acts = d.accept()     # the preempt channel, at last: taken at once, no silence needed
    assert acts[0] == AcceptPreempt(pre)
    assert RegisterMemory() in acts and StartPreemptReceiver(pre) in acts
    assert StartGuest((switch_items()[-1].events[1],), CONFIG, (True,)) in acts
    assert acts.index(ReceivePages(d.main, silence_breaks=False)) < acts.index(ResumeStream(d.main))
    assert d.s.status is S.POSTCOPY_ACTIVE
    assert d.s.get_timer() is None


def test_packaged_takes_a_pending_connection_as_preempt() -> None:
    """QEMU's rule: the connection right after main is its preempt channel, even before its silence is over."""
    d = Dest(preempt=True).to_setup_with_main()
    pre, acts = d.accept()
    assert acts == []
    acts = d.items(d.main, preamble_items() + switch_items())
    assert AcceptPreempt(pre) in acts and not of_type(acts, HoldStream)
    assert d.s.status is S.POSTCOPY_ACTIVE


def test_held_packaged_ignores_other_hosts() -> None:
    d = Dest(preempt=True).to_setup_with_main()
    d.items(d.main, preamble_items() + switch_items())
    other, acts = d.accept(OTHER_HOST)
    assert acts == []
    acts = d.advance(PREEMPT_SILENCE_SECONDS * 2)
    assert acts == [CloseConnection(other)]
    assert d.s.status is S.ACTIVE


def test_recovery_from_another_host_is_refused() -> None:
    d = Dest(preempt=False).to_paused()
    conn, acts = d.connect(b"\x08", OTHER_HOST)
    assert acts == [CloseConnection(conn)]
    assert d.s.status is S.POSTCOPY_PAUSED


@pytest.mark.parametrize("preempt", [False, True])
def test_recovery_from_another_host_after_recover_requested(preempt: bool) -> None:
    """migrate-recover: a recovery may come from any peer, and so may its preempt channel."""
    d = Dest(preempt=preempt).to_paused()
    d.feed(RecoverRequested())
    conn, acts = d.connect(b"\x08", OTHER_HOST)
    assert ReceiveStream(conn, recovery=True) in acts
    assert d.s.status is S.POSTCOPY_RECOVER
    d.recovery_main = conn
    if preempt:
        d.pre, acts = d.silent(OTHER_HOST)
        assert acts == [AcceptPreempt(d.pre)], (
            "the preempt channel of a recovery from the new host is refused: source_host is still the old host")
    acts = d.resume()
    assert d.s.status is S.POSTCOPY_ACTIVE
    if preempt:
        assert StartPreemptReceiver(d.pre) in acts


def test_fresh_stream_while_guest_runs_is_refused() -> None:
    d = Dest(preempt=False).to_postcopy_active()
    conn, acts = d.connect(b"Q")
    assert acts == [CloseConnection(conn)]
    assert d.s.status is S.POSTCOPY_ACTIVE


def test_garbage_first_byte_is_refused() -> None:
    d = Dest(preempt=False).to_setup()
    conn, acts = d.connect(b"\x00")
    assert acts == [CloseConnection(conn)] and d.s.status is S.SETUP


def test_handshake_ping_is_answered_on_the_recovery_connection() -> None:
    d = Dest(preempt=False).to_recover()
    acts = d.items(d.recovery_main, [wire.Ping(value=9)])
    assert acts == [Send(d.recovery_main, wire.encode(wire.Pong(value=9)))]


def test_preamble_ping_answered_on_the_return_path() -> None:
    d = Dest(preempt=False).to_setup_with_main()
    acts = d.items(d.main, preamble_items())
    assert AttachReturnPath(d.main) in acts
    assert SendReturnPath(wire.encode(wire.Pong(value=1))) in acts
    assert acts.index(AttachReturnPath(d.main)) < acts.index(SendReturnPath(wire.encode(wire.Pong(value=1))))


def test_ready_ping_is_answered_only_after_the_ram_setup() -> None:
    """The source stops its guest on this PONG: it must come after the memory is prepared,
    so that no part of the destination's setup falls inside the downtime."""
    from postcopy.session._source import READY_PING

    d = Dest(preempt=False).to_setup_with_main()
    acts = d.items(d.main, [*preamble_items(), wire.Ping(value=READY_PING)])
    pong = SendReturnPath(wire.encode(wire.Pong(value=READY_PING)))
    assert pong in acts
    assert acts.index(of_type(acts, PrepareMemory)[0]) < acts.index(pong)
    assert acts.index(of_type(acts, ReceivePages)[0]) < acts.index(pong)


def test_ready_ping_takes_the_pending_preempt_channel_before_it_is_answered() -> None:
    """The source stops its guest on READY's PONG: the preempt channel, connected before READY
    was sent, is classified by then (QEMU's rule: the source's next connection after main),
    not by a silence timer or a claim at PACKAGED inside the downtime."""
    from postcopy.session._source import READY_PING

    d = Dest(preempt=True).to_setup_with_main()
    d.items(d.main, preamble_items())
    pre, acts = d.accept()
    assert not of_type(acts, AcceptPreempt)               # pending: the silence would tell, later
    acts = d.items(d.main, [wire.Ping(value=READY_PING)])
    pong = SendReturnPath(wire.encode(wire.Pong(value=READY_PING)))
    assert acts == [AcceptPreempt(pre), pong]
    acts = d.items(d.main, switch_items())
    assert not of_type(acts, AcceptPreempt) and StartPreemptReceiver(pre) in acts
    assert d.s.status is S.POSTCOPY_ACTIVE


def test_ready_pong_waits_for_a_preempt_channel_not_accepted_yet() -> None:
    from postcopy.session._source import READY_PING

    d = Dest(preempt=True).to_setup_with_main()
    d.items(d.main, preamble_items())
    assert d.items(d.main, [wire.Ping(value=READY_PING)]) == []     # held: no preempt channel yet
    pre, acts = d.accept()
    # accepted as the preempt channel at once (no silence to wait for), then the PONG
    assert acts == [AcceptPreempt(pre), SendReturnPath(wire.encode(wire.Pong(value=READY_PING)))]


def test_a_held_ready_pong_goes_after_a_link_timeout_without_preempt_channel() -> None:
    from postcopy.session._source import READY_PING

    d = Dest(preempt=True, link_timeout=2.0).to_setup_with_main()
    d.items(d.main, preamble_items())
    assert d.items(d.main, [wire.Ping(value=READY_PING)]) == []
    acts = d.fire_timer()
    assert d.now == pytest.approx(2.0)
    assert SendReturnPath(wire.encode(wire.Pong(value=READY_PING))) in acts
    assert d.s.status is S.ACTIVE        # PACKAGED then fails as before (preempt_mismatch)


def test_pings_before_the_ram_setup_or_without_preempt_are_answered_at_once() -> None:
    d = Dest(preempt=True).to_setup_with_main()
    assert SendReturnPath(wire.encode(wire.Pong(value=1))) in d.items(d.main, preamble_items())
    d2 = Dest(preempt=False).to_setup_with_main()
    d2.items(d2.main, preamble_items())
    assert d2.items(d2.main, [wire.Ping(value=7)]) == [SendReturnPath(wire.encode(wire.Pong(value=7)))]


def test_start_over_then_the_whole_stream_again() -> None:
    """Pause before RUN, then the source's whole stream on a new connection: RUN goes through."""
    d = Dest(preempt=False).to_active()
    d.feed(ConnectionClosed(d.main, "reset"))
    assert d.s.status is S.SETUP and d.s.restarts == 1
    d.main, _ = d.connect(b"Q")
    d.items(d.main, preamble_items() + switch_items())
    assert d.s.status is S.POSTCOPY_ACTIVE
    assert not of_type(d.log[d.log.index(StatusChanged(S.POSTCOPY_ACTIVE)):], ResetBeforeRun)


def test_finished_session_closes_new_connections() -> None:
    d = Dest(preempt=False).to_postcopy_active()
    d.items(d.main, [wire.EndOfStream()])
    assert d.s.status is S.COMPLETED
    assert d.feed(ConnectionAccepted(5, SRC_HOST)) == [CloseConnection(5)]
    assert d.feed(StreamItem(d.main, wire.Ping(value=1))) == []


def test_paused_time_is_counted() -> None:
    d = Dest(preempt=False).to_paused()
    d.advance(4.0)
    d.recovery_main, _ = d.connect(b"\x08")
    d.advance(1.0)
    d.resume()
    assert d.s.paused_total(d.now + 100) == pytest.approx(5.0)
    assert d.s.recover_deadline is None


@pytest.mark.parametrize("preempt", [False, True])
def test_no_actions_after_finish_from_the_timer(preempt: bool) -> None:
    """Once Finish is out, handle_timer emits nothing (the shell may already have torn down).

    Reproduction: pause, a recovery starts at t=recover_timeout-1 (its
    handshake deadline is later than the recovery deadline), the recovery
    deadline fails the migration; the handshake deadline is still armed.
    """
    d = Dest(preempt=preempt, recover_timeout=30.0, link_timeout=5.0).to_paused()
    d.advance(29.0)
    d.recovery_main, _ = d.connect(b"\x08")
    acts = d.fire_timer()
    assert d.s.status is S.FAILED and of_type(acts, Finish)
    later = d.s.handle_timer(d.now + 10.0)
    assert later == [], f"actions after Finish: {later}"


def test_a_stranger_knocking_during_postcopy_does_not_break_the_link() -> None:
    """Issue 14 case 1: a connect, garbage or a wrong first command during postcopy pauses nothing."""
    d = Dest(preempt=True).to_postcopy_active()
    conn, acts = d.connect(b"\x08")
    assert acts == [ReceiveStream(conn, recovery=True)]
    acts = d.items(conn, [wire.OpenReturnPath()])
    assert acts == [CloseConnection(conn)]
    assert d.s.refused["malformed"] == 1
    bare, _ = d.accept()
    assert d.fire_timer() == [CloseConnection(bare)]           # silent, and no preempt was due
    junk, acts = d.connect(b"G")
    assert acts == [CloseConnection(junk)]
    stall, _ = d.connect(b"\x08")
    assert d.advance(d.link_timeout) == [CloseConnection(stall)]
    assert d.s.refused["stalled"] == 1
    assert d.s.status is S.POSTCOPY_ACTIVE
    assert not of_type(d.log[-8:], BreakLink)


def test_a_stream_that_stalls_before_its_ram_setup_is_dropped() -> None:
    """Issue 14 case 3: one byte then silence holds nothing: dropped after the link timeout."""
    d = Dest(preempt=False, link_timeout=2.0).to_setup_with_main()
    acts = d.advance(2.0)
    assert of_type(acts, ResetBeforeRun)
    assert d.s.refused["stalled"] == 1
    assert d.s.status is S.SETUP
    assert not of_type(acts, Finish)


@pytest.mark.parametrize("fail_fast", [False, True])
def test_a_bad_stream_before_run_fails_only_with_fail_fast(fail_fast: bool) -> None:
    d = Dest(preempt=False, fail_fast=fail_fast).to_active()
    acts = d.items(d.main, [wire.PostcopyRamDiscard(idstr="nope", ranges=((0, 4096),))])
    assert bool(of_type(acts, Finish)) is fail_fast
    assert d.s.status is (S.FAILED if fail_fast else S.SETUP)


def test_a_newer_stream_from_another_host_is_refused() -> None:
    d = Dest(preempt=False).to_setup_with_main()
    conn, acts = d.connect(b"Q", host=OTHER_HOST)
    assert acts == [CloseConnection(conn)]
    assert d.s.refused["wrong_peer"] == 1


# -- what a destination keeps of a QEMU stream; a preempt channel it does not expect ---------------


def test_start_guest_carries_configuration_and_where_each_section_came() -> None:
    """An owner that keeps the VM as received (a snapshot) gets the configuration section and,
    for each device section, whether it came inside PACKAGED."""
    d = Dest(preempt=False).to_setup_with_main()
    outside = wire.DeviceSection(section_id=9, idstr="timer", instance_id=0, version_id=2, payload=b"\x07")
    d.items(d.main, [*preamble_items(), outside])
    acts = d.items(d.main, switch_items())
    assert of_type(acts, StartGuest) == [StartGuest((outside, DEVICE), CONFIG, (False, True))]


def test_unexpected_preempt_channel_fails_at_packaged() -> None:
    """Preempt off here, QEMU 7.2 with preempt: its preempt channel connects right after main
    and stays silent; at PACKAGED that is a mismatch, said at once (not a hang on requests)."""
    d = Dest(preempt=False, link_timeout=3.0).to_setup_with_main()
    d.accept()                          # silent, still pending: QEMU's preempt channel
    d.items(d.main, preamble_items())
    acts = d.items(d.main, switch_items())
    _failed_kind(d, acts, "preempt_mismatch")
    assert "postcopy-preempt" in str(d.s.error) and not of_type(acts, StartGuest)
    assert BreakLink() in acts


def test_packaged_without_preempt_first_collects_the_queued_connections() -> None:
    """QEMU 7.2 opens its preempt channel before PACKAGED, but a shell's accept may lag behind
    its stream reader (a small guest's stream then ends before any silence says it). PACKAGED
    is held until the shell reports what waits on its listeners; one from the source fails."""
    d = Dest(preempt=False, link_timeout=3.0).to_setup_with_main()
    d.items(d.main, preamble_items())
    late = d.queue()                    # connected before PACKAGED, not yet reported
    acts = d.items(d.main, switch_items())
    hold = acts.index(HoldStream(d.main))
    assert acts[hold + 1] == CollectConnections()
    _failed_kind(d, acts, "preempt_mismatch")
    assert "postcopy-preempt" in str(d.s.error) and not of_type(acts, StartGuest)
    assert CloseConnection(late) in acts and ResumeStream(d.main) not in acts


@pytest.mark.parametrize("stranger", [False, True], ids=["none-queued", "stranger-queued"])
def test_packaged_without_preempt_goes_on_when_no_source_connection_waits(stranger: bool) -> None:
    d = Dest(preempt=False, link_timeout=3.0).to_setup_with_main()
    d.items(d.main, preamble_items())
    if stranger:
        other = d.queue("10.9.9.9")     # not the source's host: no preempt channel of its
    acts = d.items(d.main, switch_items())
    hold = acts.index(HoldStream(d.main))
    assert acts[hold + 1] == CollectConnections()
    assert d.s.status is S.POSTCOPY_ACTIVE
    guest = acts.index(of_type(acts, StartGuest)[0])
    assert acts.index(ResumeStream(d.main)) > guest      # the stream goes on after PACKAGED's commands
    if stranger:
        assert other in d.s.pending


def test_unexpected_preempt_channel_fails_within_link_timeout() -> None:
    """A long precopy phase: the silent connection fails the migration after link_timeout."""
    d = Dest(preempt=False, link_timeout=2.0).to_active()
    conn, acts = d.accept()
    assert acts == [] and d.s.get_timer() == pytest.approx(d.now + 2.0)
    acts = d.fire_timer()
    _failed_kind(d, acts, "preempt_mismatch")
    assert CloseConnection(conn) in acts


def test_unexpected_silent_connection_from_another_host_is_only_refused() -> None:
    d = Dest(preempt=False, link_timeout=2.0).to_active()
    conn, _ = d.accept(OTHER_HOST)
    acts = d.fire_timer()
    assert acts == [CloseConnection(conn)] and d.s.status is S.ACTIVE


def test_silence_breaks_the_link_only_once_the_source_has_pinged() -> None:
    """QEMU sends no heartbeat: a quiet QEMU source is not a broken link. Our source's first
    heartbeat PING after RUN turns the receive timeout on."""
    d = Dest(preempt=False).to_postcopy_active()
    assert ReceivePages(d.main, silence_breaks=False) in d.log
    acts = d.items(d.main, [wire.Ping(value=4)])            # an ordinary PING: no change
    assert not of_type(acts, ReceivePages)
    acts = d.items(d.main, [wire.Ping(value=HEARTBEAT_PING | 7)])
    assert ReceivePages(d.main, silence_breaks=True) in acts
    assert not of_type(d.items(d.main, [wire.Ping(value=HEARTBEAT_PING | 8)]), ReceivePages)


def test_preempt_requests_ping_sends_page_requests_on_the_preempt_channel() -> None:
    """Our source reads page requests on the preempt channel's way back and says so with
    PREEMPT_REQUESTS_PING (answered as any PING): the preempt receiver is started with
    ``requests`` then, at LISTEN or when a preempt channel held for comes; a source that never
    said so (QEMU) gets them on the return path. A recovery is a new connection: it says so again."""
    requests_ping = wire.Ping(value=PREEMPT_REQUESTS_PING)
    pong = SendReturnPath(wire.encode(wire.Pong(value=PREEMPT_REQUESTS_PING)))
    for said in (True, False):
        d = Dest(preempt=True).to_setup_with_main()
        d.pre, _ = d.silent()
        acts = d.items(d.main, [*preamble_items(), *([requests_ping] if said else [])])
        assert (pong in acts) is said
        acts = d.items(d.main, switch_items())
        assert StartPreemptReceiver(d.pre, requests=said) in acts
    # the preempt channel comes after PACKAGED (held): started with what was said before
    d = Dest(preempt=True).to_setup_with_main()
    d.items(d.main, [*preamble_items(), requests_ping])
    assert d.items(d.main, switch_items())[-1] == HoldStream(d.main)
    pre, acts = d.accept()
    assert StartPreemptReceiver(pre, requests=True) in acts
    # a recovery's source says it on its new connection, before RESUME; a recovery that does not: not
    for said in (True, False):
        d = Dest(preempt=True)
        d.to_setup_with_main()
        d.pre, _ = d.silent()
        d.items(d.main, [*preamble_items(), requests_ping])
        d.items(d.main, switch_items())
        d.items(d.main, [wire.Ping(value=4)])
        d.feed(ConnectionClosed(d.main, "reset"))
        d.feed(ConnectionClosed(d.pre, "reset"))
        d.recovery_main, _ = d.connect(b"\x08")
        d.pre, _ = d.silent()
        if said:
            acts = d.items(d.recovery_main, [requests_ping])
            assert acts == [Send(d.recovery_main, wire.encode(wire.Pong(value=PREEMPT_REQUESTS_PING)))]
        acts = d.resume()
        assert d.s.status is S.POSTCOPY_ACTIVE
        assert StartPreemptReceiver(d.pre, requests=said) in acts


@pytest.mark.parametrize(("item", "reason"), [(wire.EndOfStream(), "malformed"), (wire.Ping(value=5), "malformed"),
                                              (wire.ConnectionClosed(complete=False), "stalled")])
def test_a_recovery_stream_that_goes_on_before_resume_is_answered_is_refused(item, reason: str) -> None:
    """RESUME waits for its preempt channel (the stream held): anything more on it before RESUME_ACK
    is a source that did not wait. Found by the state machine: its EOF completed a migration still in
    postcopy-recover (IllegalTransition). Now the attempt is refused, the migration paused for the next."""
    d = Dest(preempt=True).to_paused()
    d.recovery_main, _ = d.connect(b"\x08")
    assert d.resume()[-1] == HoldStream(d.recovery_main)      # no preempt channel yet
    assert d.s.status is S.POSTCOPY_RECOVER
    acts = d.items(d.recovery_main, [item])
    assert d.s.status is S.POSTCOPY_PAUSED
    assert CloseConnection(d.recovery_main) in acts and AttachReturnPath(None) in acts
    assert not of_type(acts, Finish) and not of_type(acts, CheckComplete)
    assert d.s.refused[reason] == 1
    # the next attempt recovers as ever
    d.recovery_main, _ = d.connect(b"\x08")
    d.pre, _ = d.silent()
    d.resume()
    assert d.s.status is S.POSTCOPY_ACTIVE
