"""A device section has no length: it ends at the first footer ``7e <section id>`` that is
followed by a plausible item. Device state is arbitrary bytes, and a real QEMU 7.2 run once
held a footer look-alike followed by 0x00 (QEMU_VM_EOF) inside a PACKAGED blob's device
section: the decoder took the section's end there and failed on "13456 bytes after
QEMU_VM_EOF" (a destination started the stream over instead of carrying on). EOF is
plausible only where a stream can end: as the last byte so far, or before VMDESCRIPTION
outside a PACKAGED blob."""

from __future__ import annotations

import pytest

from postcopy.wire import MainStreamDecoder, NeedData, encode
from postcopy.wire import _events as ev

HEADER = (ev.StreamHeader(version=3), ev.Configuration(machine_type="pc-q35-7.2"))
SID = 0x21


def device(payload: bytes, sid: int = SID) -> ev.DeviceSection:
    return ev.DeviceSection(section_id=sid, idstr="timer", instance_id=0, version_id=2, payload=payload)


def look_alike(after: bytes) -> bytes:
    """Device state with a footer of its own section followed by ``after``, and more state."""
    return bytes(range(40)) + b"\x7e" + SID.to_bytes(4, "big") + after + bytes(range(200, 256)) * 3


def decode(*events: ev.WireEvent, piece: int | None = None) -> list[ev.WireEvent]:
    data = b"".join(encode(e) for e in (*HEADER, *events))
    dec = MainStreamDecoder()
    out: list[ev.WireEvent] = []
    step = piece or len(data)
    for i in range(0, len(data), step):
        dec.receive_data(data[i:i + step])
        while not isinstance(e := dec.next_event(), NeedData):
            out.append(e)
    return out[len(HEADER):]


@pytest.mark.parametrize("after", [b"\x00\x00\x00\x00\x00\x00\x00\x00\x21", b"\x00\x06", b"\x00\x08"],
                         ids=["eof-then-zeros", "eof-vmdescription-byte", "eof-command-byte"])
@pytest.mark.parametrize("piece", [None, 1, 7])
def test_an_eof_look_alike_inside_a_packaged_device_section_is_payload(after: bytes, piece: int | None) -> None:
    inner = (ev.PostcopyListen(), device(look_alike(after)), device(b"\x01\x02", sid=SID + 1), ev.PostcopyRun())
    [pkg] = decode(ev.Packaged(events=inner), piece=piece)
    assert isinstance(pkg, ev.Packaged)
    assert pkg.events == inner


@pytest.mark.parametrize("piece", [None, 4096])
def test_an_eof_look_alike_in_a_device_section_of_the_main_stream_is_payload(piece: int | None) -> None:
    """QEMU's precopy completion: device sections, EOF, VMDESCRIPTION. (A look-alike whose
    0x00 is the last byte received so far is still taken for the end: a QEMU with
    suppress-vmdesc sends nothing after EOF and waits for SHUT, and a decoder has no clock
    to tell the two apart.)"""
    state = device(look_alike(b"\x00\x00\x00\x00\x00\x00\x00\x00\x21"))
    events = (state, ev.EndOfStream(), ev.VmDescription(json=b'{"page_size": 4096}'))
    assert decode(*events, piece=piece) == list(events)


def test_the_footer_before_a_real_eof_still_ends_the_section() -> None:
    """The last device section before EOF with nothing after it (no VMDESCRIPTION sent yet)."""
    state = device(b"\x00\x01\x02\x03")
    assert decode(state, ev.EndOfStream()) == [state, ev.EndOfStream()]
