"""wire.warm_up: the switch's codec paths rehearsed before a guest stops."""

from __future__ import annotations

import pytest

from postcopy import wire
from postcopy.wire import _warm


def test_warm_up_round_trips_a_switch_and_a_pong() -> None:
    wire.warm_up()      # raises if the rehearsal does not decode what it encoded
    wire.warm_up()      # and again: nothing is kept between calls


def test_a_rehearsal_that_does_not_round_trip_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    class Dropping(wire.ReturnPathDecoder):
        def events(self) -> list[wire.WireEvent]:
            return []

    monkeypatch.setattr(_warm, "ReturnPathDecoder", Dropping)
    with pytest.raises(AssertionError, match="warm_up decoded"):
        wire.warm_up()
