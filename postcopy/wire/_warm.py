"""Rehearse the switch's codec paths once, before any guest stops.

The first encode of PACKAGED and the first decode of it in a process cost
100-200 us more than the next ones (lazy lookups, caches, the interpreter's
specialization); at a real switch that time is the guest's downtime."""

from __future__ import annotations

from ._encode import encode
from ._events import DeviceSection, Packaged, Ping, Pong, PostcopyListen, PostcopyRun, WireEvent
from ._main import MainStreamDecoder
from ._return_path import ReturnPathDecoder


def warm_up() -> None:
    """Encode and decode a switch (PING, PACKAGED with LISTEN, a device section, PING and RUN)
    and a PONG on the return path, and throw the results away. Under a millisecond."""
    device = DeviceSection(section_id=1, idstr="warm-up", instance_id=0, version_id=1, payload=bytes(64))
    switch: list[WireEvent] = [Ping(value=2), Packaged(events=(PostcopyListen(), device, Ping(value=3), PostcopyRun())), Ping(value=4)]
    main = MainStreamDecoder(recovery=True)
    main.receive_data(b"".join(encode(e) for e in switch))
    decoded = main.events()
    rp = ReturnPathDecoder()
    rp.receive_data(encode(Pong(value=3)))
    decoded += rp.events()
    if len(decoded) != len(switch) + 1:     # a rehearsal that does not round-trip is a codec bug
        raise AssertionError(f"warm_up decoded {decoded!r}")
