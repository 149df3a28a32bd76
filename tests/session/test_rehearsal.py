"""The switch rehearsed on scratch sessions (session/_rehearsal.py): both sessions reach
postcopy through the real codec, a broken protocol is reported, and a role's process pays for
it once per preempt setting."""

from __future__ import annotations

import pytest

from postcopy import wire
from postcopy.session import _rehearsal, rehearse_switch, rehearse_switch_once
from postcopy.session._destination import DestinationSession


@pytest.mark.parametrize("preempt", [False, True])
def test_a_rehearsal_takes_both_sessions_through_packaged_to_pong_3(
        preempt: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[type] = []
    handle = DestinationSession.handle

    def spying(self: DestinationSession, event: object, now: float) -> list:
        inner = getattr(event, "event", None)
        if inner is not None:
            seen.append(type(inner))
        return handle(self, event, now)      # type: ignore[arg-type]

    monkeypatch.setattr(DestinationSession, "handle", spying)
    pongs: list[int] = []
    rp_events = wire.ReturnPathDecoder.events

    def counting(self: wire.ReturnPathDecoder) -> list[wire.WireEvent]:
        out = rp_events(self)
        pongs.extend(e.value for e in out if isinstance(e, wire.Pong))
        return out

    monkeypatch.setattr(wire.ReturnPathDecoder, "events", counting)
    rehearse_switch(preempt, rounds=3)
    assert seen.count(wire.Packaged) == 3      # decoded from the source session's bytes, handled
    assert pongs.count(3) == 3                  # and the source heard PONG 3 each time


def test_a_rehearsal_that_does_not_reach_postcopy_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    class Deaf:
        """A return path that takes the destination's bytes and yields nothing: the source never
        hears its PONGs, so it never stops its guest. (Not a subclass: the codec may be compiled.)"""

        def receive_data(self, data: bytes) -> None:
            pass

        def events(self) -> list[wire.WireEvent]:
            return []

    monkeypatch.setattr(_rehearsal.wire, "ReturnPathDecoder", Deaf)
    with pytest.raises(AssertionError, match="rehearsal ended with the source active"):
        rehearse_switch(True, rounds=1)


def test_a_process_rehearses_once_per_preempt_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[bool] = []
    monkeypatch.setattr(_rehearsal, "_rehearsed", set())
    monkeypatch.setattr(_rehearsal, "rehearse_switch", lambda preempt, rounds=0: runs.append(preempt))
    for preempt in (True, False, True, True, False):
        rehearse_switch_once(preempt)
    assert runs == [True, False]
