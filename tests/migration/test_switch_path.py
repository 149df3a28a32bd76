"""The destination's switch path pieces (issue 13, downtime): the commands that come
together are decoded in one pass with exact consumption and bounded copies, and the
GIL switch interval is lowered only while some thread is on the critical path."""

from __future__ import annotations

import socket
import sys
import threading

from postcopy import wire
from postcopy._datapath import DECODE_CHUNK, RX_MAIN, Receiver, decoded_items
from postcopy._link import QUICK_SWITCH_INTERVAL, quick_gil_handoff

LAYOUT = wire.RamLayout(blocks=(wire.RamBlockLayout(idstr="pc.ram", used_length=1 << 30),), section_id=2)
DEVICE = wire.DeviceSection(section_id=3, idstr="dev", instance_id=0, version_id=1, payload=b"\x01" * 300)


def test_commands_decoded_one_by_one_leave_the_pages_behind_in_the_c_buffer() -> None:
    switch = [wire.Ping(value=2),
              wire.Packaged(events=(wire.PostcopyListen(), DEVICE, wire.Ping(value=3), wire.PostcopyRun())),
              wire.Ping(value=4)]
    head = b"".join(wire.encode(e) for e in switch)
    tail = bytes([wire.SectionType.PART]) + b"\x00" * (4 * DECODE_CHUNK)     # a page run behind them
    a, b = socket.socketpair()
    try:
        rx = Receiver(None, a, RX_MAIN, LAYOUT.section_id or 0)
        sender = threading.Thread(target=b.sendall, args=(head + tail,))
        sender.start()
        assert rx.input.fill(len(head) + len(tail)) >= len(head) + len(tail)
        sender.join()
        dec = wire.MainStreamDecoder(recovery=True, layout=LAYOUT)
        items = decoded_items(rx.input, dec)
        got = []
        while True:
            got.append(next(items))
            if rx.input.first_byte() != wire.SectionType.COMMAND:
                break
        assert got == switch
        # exactly the commands' bytes consumed: the page run is the C loop's, untouched
        assert rx.input.available() == len(tail)
        assert rx.input.first_byte() == wire.SectionType.PART
        assert rx.input.peek(0, 16) == tail[:16]
    finally:
        a.close()
        b.close()


def test_first_byte_of_an_empty_buffer_is_none() -> None:
    a, b = socket.socketpair()
    try:
        rx = Receiver(None, a, RX_MAIN, 2)
        assert rx.input.first_byte() is None
    finally:
        a.close()
        b.close()


def test_quick_gil_handoff_is_counted_and_restores_the_interval() -> None:
    before = sys.getswitchinterval()
    quick_gil_handoff(True)
    quick_gil_handoff(True)         # a second user (the other role in the same process)
    assert sys.getswitchinterval() <= QUICK_SWITCH_INTERVAL + 1e-9
    quick_gil_handoff(False)
    assert sys.getswitchinterval() <= QUICK_SWITCH_INTERVAL + 1e-9     # still one user
    quick_gil_handoff(False)
    assert sys.getswitchinterval() == before
    quick_gil_handoff(False)        # unmatched: nothing changes
    assert sys.getswitchinterval() == before
