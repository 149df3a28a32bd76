"""``encode`` dispatches on the event's type through one table: every wire event has an entry,
and the commands and return-path messages it writes decode back to the same events."""

from __future__ import annotations

import typing

import pytest

from postcopy import wire
from postcopy.wire import _events as ev
from postcopy.wire._encode import _ENCODERS


def test_every_wire_event_type_has_an_encoder() -> None:
    assert set(typing.get_args(ev.WireEvent)) == set(_ENCODERS)


def test_what_is_not_a_wire_event_is_refused() -> None:
    # (the compiled core's argument check says so in its own words, with the same type)
    with pytest.raises(TypeError, match=r"not a wire event|object expected; got list"):
        wire.encode([wire.Ping(value=1)])       # type: ignore[arg-type]


SWITCH = [
    wire.Ping(value=2),
    wire.Packaged(events=(wire.PostcopyListen(),
                          wire.DeviceSection(section_id=3, idstr="dev", instance_id=0, version_id=1, payload=b"\x01" * 8),
                          wire.Ping(value=3), wire.PostcopyRun())),
    wire.Ping(value=4),
    wire.PostcopyRamDiscard(idstr="pc.ram", ranges=((0, 0x2000), (0x4000, 0x1000))),
    wire.OpenReturnPath(), wire.PostcopyResume(), wire.RecvBitmapRequest(idstr="pc.ram"),
    wire.PostcopyAdvise(pagesize_summary=0x1000, target_page_size=0x1000),
]


def test_commands_decode_back_to_the_events_encoded() -> None:
    dec = wire.MainStreamDecoder(recovery=True)
    dec.receive_data(b"".join(wire.encode(e) for e in SWITCH))
    assert dec.events() == SWITCH


RETURN_PATH = [wire.Pong(value=3), wire.Shut(value=0), wire.ResumeAck(value=1),
               wire.PageRequest(start=0x2000, length=0x1000, idstr="pc.ram"),
               wire.PageRequest(start=0x3000, length=0x1000, idstr=None)]


def test_return_path_messages_decode_back_to_the_events_encoded() -> None:
    dec = wire.ReturnPathDecoder()
    dec.receive_data(b"".join(wire.encode(e) for e in RETURN_PATH))
    assert dec.events() == RETURN_PATH
