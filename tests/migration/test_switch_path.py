"""The switch path pieces (issue 13, downtime): the commands that come together are
decoded in one pass with exact consumption and bounded copies, and the GIL switch
interval is lowered and the garbage collector held off only while some thread is on
the critical path."""

from __future__ import annotations

import gc
import resource
import socket
import sys
import threading
import time

import harness
import pytest

from postcopy import wire
from postcopy._datapath import DECODE_CHUNK, RX_MAIN, DestinationPath, Receiver, decoded_items
from postcopy import destination as destination_module
from postcopy import source as source_module
from postcopy._link import QUICK_SWITCH_INTERVAL, hold_gc, quick_gil_handoff
from postcopy.owner import BuiltinGuest
from postcopy.spec import GuestSpec
from uffd import RamBlock

PAGE = 4096

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


def _path_with(backing: str) -> tuple[DestinationPath, RamBlock]:
    block = RamBlock("pc.ram", 64 * PAGE, backing=backing)   # type: ignore[arg-type]
    return DestinationPath([block], verify=False), block


def test_discard_ranges_drops_placed_pages_and_only_marks_the_rest_missing() -> None:
    """One C call per discard command (issue 13: after precopy, hundreds of ranges fall
    inside the downtime): a range with a placed page is dropped from memory, a range with
    none only becomes missing (memory untouched), both in one call."""
    for backing in ("anon", "memfd"):
        path, block = _path_with(backing)
        try:
            view = block.view()
            view[0:PAGE] = b"\x11" * PAGE                 # placed (received bit set)
            view[8 * PAGE:9 * PAGE] = b"\x22" * PAGE      # written but never received: not ours to drop
            path.received[0].set_range(0, 4)
            assert path.discard_ranges(0, [(0, 4 * PAGE), (8 * PAGE, 2 * PAGE)]) == 1
            assert path.received[0].count() == 0
            assert bytes(view[0:PAGE]) == b"\x00" * PAGE, backing
            assert bytes(view[8 * PAGE:9 * PAGE]) == b"\x22" * PAGE, backing
            view.release()
        finally:
            block.close()


def test_discard_ranges_checks_every_range_before_applying_any() -> None:
    path, block = _path_with("anon")
    try:
        path.received[0].set_range(0, 2)
        with pytest.raises(ValueError, match="offset 0x41000"):
            path.discard_ranges(0, [(0, PAGE), (65 * PAGE, PAGE)])
        assert path.received[0].count() == 2           # nothing applied
        with pytest.raises(ValueError, match="outside the block"):
            path.discard_ranges(0, [(PAGE + 1, PAGE)])
        assert path.discard_ranges(0, []) == 0
    finally:
        block.close()


def _receive_after(rx: Receiver, b: socket.socket, delay: float) -> tuple[bytes, float, int]:
    """rx's thread waits for 4 bytes sent ``delay`` s later: (the bytes, that thread's CPU
    seconds, its involuntary context switches meanwhile)."""
    timer = threading.Timer(delay, b.sendall, args=(b"ping",))
    timer.start()
    cpu0 = time.thread_time()
    switches0 = resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw
    assert rx.input.fill(4) == 4
    cpu = time.thread_time() - cpu0
    switches = resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw - switches0
    timer.join()
    data = rx.input.peek()
    rx.input.consume(4)
    return data, cpu, switches


def test_a_spinning_reader_waits_on_its_cpu_and_only_until_its_deadline() -> None:
    """spin_for: around the switch the reader polls (on its CPU, not asleep, so no wake-up
    latency), for a bounded time; disarmed or past the deadline, it sleeps in recv again.
    The spinning reader yields between polls: on a busy machine it shows as CPU time when
    nothing else wanted the CPU, as yields to the others (involuntary switches) when they did."""
    a, b = socket.socketpair()
    try:
        rx = Receiver(None, a, RX_MAIN, 0)
        data, asleep_cpu, _ = _receive_after(rx, b, 0.05)
        assert data == b"ping"
        assert asleep_cpu < 0.02
        rx.input.spin_for(1.0)
        data, spinning_cpu, yielded = _receive_after(rx, b, 0.05)
        assert data == b"ping"
        assert spinning_cpu > 0.01 or yielded >= 3, (spinning_cpu, yielded)     # asleep: ~0 and 0
        rx.input.spin_for(0.0)
        data, cpu, _ = _receive_after(rx, b, 0.05)
        assert data == b"ping"
        assert cpu < 0.02
        rx.input.spin_for(0.01)                             # a deadline that passes mid-wait
        data, cpu, _ = _receive_after(rx, b, 0.1)
        assert data == b"ping"
        assert cpu < 0.05
    finally:
        a.close()
        b.close()


def test_hold_gc_is_counted_and_puts_the_collector_back_as_it_was() -> None:
    assert gc.isenabled()
    hold_gc(True)
    hold_gc(True)       # the other role in the same process
    assert not gc.isenabled()
    hold_gc(False)
    assert not gc.isenabled()
    hold_gc(False)
    assert gc.isenabled()
    gc.disable()        # an application that runs without the collector keeps it off
    try:
        hold_gc(True)
        hold_gc(False)
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.parametrize("role", ["source", "destination"])
def test_no_garbage_collection_inside_the_switch(role: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A collection the switch's allocations start inside the downtime cost 0.4-0.7 ms of it: the
    source holds the collector off from its guest's stop to PONG 3, the destination from the
    switch's first command to RUN. Each role is checked with the other's hold taken out (both
    run in this process); the collector is back on once the migration is over."""
    other = destination_module if role == "source" else source_module
    monkeypatch.setattr(other, "hold_gc", lambda on: None)
    seen: list[bool] = []
    method = "save_device_state" if role == "source" else "load_device_state"
    original = getattr(BuiltinGuest, method)

    def record(self: BuiltinGuest, *args: object, **kw: object) -> object:
        seen.append(gc.isenabled())
        return original(self, *args, **kw)

    monkeypatch.setattr(BuiltinGuest, method, record)
    spec = GuestSpec.simple(16 << 20, vcpus=1)
    o = harness.migrate(spec, preempt=True, warmup=0.05)
    harness.check(o, spec)
    assert seen == [False]
    assert gc.isenabled()
