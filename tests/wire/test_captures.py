"""Every real QEMU 7.2 capture decodes completely and re-encodes to the same bytes."""

from __future__ import annotations

import hashlib
import random

import pytest

from postcopy.wire import (
    ConnectionClosed,
    DeviceSection,
    MainStreamDecoder,
    NeedData,
    Packaged,
    Ping,
    PostcopyListen,
    PostcopyRamDiscard,
    PostcopyRun,
    PreemptDecoder,
    RamPages,
    ReturnPathDecoder,
    encode,
    tally_pages,
)

MAIN = {
    "64M-postcopy-immediate/capture/conn0.s2d.bin.xz": True,
    "64M-precopy1s-then-postcopy/capture/conn0.s2d.bin.xz": True,
    "64M-postcopy-preempt-cap16M/capture/conn0.s2d.bin.xz": True,
    # cut by migrate-pause: closed at a record boundary, before its EOF
    "64M-postcopy-recover-pause-cap16M/capture/conn0.s2d.bin.xz": False,
}
RP = [
    "64M-postcopy-immediate/capture/conn0.d2s.bin.xz",
    "64M-precopy1s-then-postcopy/capture/conn0.d2s.bin.xz",
    "64M-postcopy-preempt-cap16M/capture/conn0.d2s.bin.xz",
    "64M-postcopy-preempt-cap16M/capture/conn1.d2s.bin.xz",
    "64M-postcopy-recover-pause-cap16M/capture/conn0.d2s.bin.xz",
    "64M-postcopy-recover-pause-cap16M/capture-resume/conn0.d2s.bin.xz",
]
RECOVER = "64M-postcopy-recover-pause-cap16M/"


def _decode_main(data: bytes, **kw):
    dec = MainStreamDecoder(**kw)
    dec.receive_data(data)
    dec.receive_data(b"")
    return dec


def _roundtrip(events) -> str:
    h = hashlib.sha256()
    for ev in events:
        h.update(encode(ev))
    return h.hexdigest()


@pytest.mark.parametrize(("rel", "complete"), MAIN.items())
def test_main_stream_decodes_completely_and_reencodes(load_capture, drain_events, rel, complete):
    data = load_capture(rel)
    dec = _decode_main(data)
    events = drain_events(dec)
    assert dec.offset == len(data)
    assert events[-1] == ConnectionClosed(complete=complete)
    assert _roundtrip(events) == hashlib.sha256(data).hexdigest()
    assert dec.layout is not None
    assert dec.layout.blocks[0].idstr == "pc.ram"


def test_recovery_and_preempt_streams(load_capture, drain_events):
    original = _decode_main(load_capture(RECOVER + "capture/conn0.s2d.bin.xz"))
    drain_events(original)
    data = load_capture(RECOVER + "capture-resume/conn0.s2d.bin.xz")
    dec = _decode_main(data, recovery=True, layout=original.layout)
    events = drain_events(dec)
    assert events[-1] == ConnectionClosed(complete=True)
    assert dec.offset == len(data)
    assert _roundtrip(events) == hashlib.sha256(data).hexdigest()

    main = _decode_main(load_capture("64M-postcopy-preempt-cap16M/capture/conn0.s2d.bin.xz"))
    drain_events(main)
    data = load_capture("64M-postcopy-preempt-cap16M/capture/conn1.s2d.bin.xz")
    pre = PreemptDecoder(layout=main.layout)
    pre.receive_data(data)
    pre.receive_data(b"")
    events = drain_events(pre)
    assert pre.saw_eos
    assert pre.offset == len(data)
    assert b"".join(encode(e) for e in events) == data
    pages = [e for e in events if isinstance(e, RamPages)]
    assert all(e.channel == 1 for e in pages)
    assert sum(len(e) for e in pages) == sum(sum(tally_pages(e.records, 6)[0]) for e in pages)


@pytest.mark.parametrize("rel", RP)
def test_return_path_decodes_completely_and_reencodes(load_capture, drain_events, rel):
    data = load_capture(rel)
    dec = ReturnPathDecoder()
    if data:  # the preempt connection's reverse direction is empty
        dec.receive_data(data)
    dec.receive_data(b"")
    events = drain_events(dec)
    assert dec.offset == len(data)
    assert b"".join(encode(e) for e in events) == data


def test_immediate_capture_landmarks(load_capture, drain_events):
    """Offsets from the capture README's landmark table."""
    data = load_capture("64M-postcopy-immediate/capture/conn0.s2d.bin.xz")
    dec = _decode_main(data)
    at = {}
    while True:
        off = dec.offset
        ev = dec.next_event()
        at.setdefault(type(ev).__name__, []).append((off, ev))
        if isinstance(ev, ConnectionClosed):
            break
    assert at["OpenReturnPath"][0][0] == 26
    assert [(o, e.value) for o, e in at["Ping"]] == [(31, 1), (453, 2), (13980, 4)]
    assert at["PostcopyAdvise"][0][0] == 40
    discard_at, discard = at["PostcopyRamDiscard"][0]
    assert (discard_at, discard.idstr) == (231, "pc.ram")
    [(pkg_at, pkg)] = at["Packaged"]
    assert pkg_at == 462
    assert len(encode(pkg)) - 9 == 13509
    assert isinstance(pkg.events[0], PostcopyListen)
    assert isinstance(pkg.events[-1], PostcopyRun)
    assert pkg.events[-2] == Ping(value=3)
    devices = [e for e in pkg.events if isinstance(e, DeviceSection)]
    assert devices
    assert devices[0].idstr == "timer"
    assert devices[-1].idstr == "globalstate"
    # RUN sits at 13975: LISTEN at 471 plus everything before RUN inside the blob
    assert 471 + sum(len(encode(e)) for e in pkg.events[:-1]) == 13975
    assert sum(1 for _, e in at["PostcopyRamDiscard"] if e.idstr == "pc.ram") == 1
    assert dec.postcopy


def test_precopy_capture_landmarks(load_capture):
    data = load_capture("64M-precopy1s-then-postcopy/capture/conn0.s2d.bin.xz")
    dec = _decode_main(data)
    seen = {}
    while not isinstance(ev := dec.next_event(), ConnectionClosed):
        if isinstance(ev, PostcopyRamDiscard) and ev.idstr == "pc.ram":
            seen["discard"] = dec.offset - len(encode(ev))
        if isinstance(ev, Packaged):
            start = dec.offset - len(encode(ev))
            seen["listen"] = start + 9
            seen["run"] = start + len(encode(ev)) - 5
    assert seen == {"discard": 18466204, "listen": 18466444, "run": 18479948}


def test_chunked_feeding_gives_the_same_bytes_and_pages(load_capture):
    """Random chunk sizes (1 byte .. 200 KiB) change batching, never content."""
    data = load_capture("64M-postcopy-preempt-cap16M/capture/conn0.s2d.bin.xz")
    rng = random.Random(7)
    dec = MainStreamDecoder()
    h = hashlib.sha256()
    pages = [0, 0]
    pos = 0
    done = False
    while not done:
        ev = dec.next_event()
        if isinstance(ev, NeedData):
            n = rng.choice((1, 7, 4096, 4105, 65536, 200_000))
            dec.receive_data(data[pos : pos + n])
            pos = min(len(data), pos + n)
            continue
        h.update(encode(ev))
        if isinstance(ev, RamPages):
            normal, zero = tally_pages(ev.records, len(ev.blocks))[0]
            pages[0] += normal
            pages[1] += zero
        done = isinstance(ev, ConnectionClosed)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    whole = _decode_main(data)
    ref = [0, 0]
    while not isinstance(ev := whole.next_event(), ConnectionClosed):
        if isinstance(ev, RamPages):
            n, z = tally_pages(ev.records, len(ev.blocks))[0]
            ref[0] += n
            ref[1] += z
    assert pages == ref
    assert ref[0] > 1000
