"""Fuzzing: arbitrary or mutated input gives events or RemoteProtocolError, nothing else.

Also the differential test of the C scanner against the pure-Python reference.
"""

from __future__ import annotations

import lzma
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postcopy.wire import (
    ERROR_KINDS,
    ConnectionClosed,
    MainStreamDecoder,
    NeedData,
    PreemptDecoder,
    RamBlockLayout,
    RamLayout,
    RemoteProtocolError,
    ReturnPathDecoder,
    c_scanner,
)
from postcopy.wire._ramscan_ref import RefScanState, ref_scan

CAPS = Path(__file__).resolve().parents[1] / "data" / "qemu-7.2"
FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def _prefix(rel: str, n: int) -> bytes:
    with lzma.open(CAPS / rel) as f:
        return f.read(n)


MAIN = _prefix("64M-postcopy-immediate/capture/conn0.s2d.bin.xz", 24000)
RESUME = _prefix("64M-postcopy-recover-pause-cap16M/capture-resume/conn0.s2d.bin.xz", 12000)
PREEMPT = _prefix("64M-postcopy-preempt-cap16M/capture/conn1.s2d.bin.xz", 12000)
RP = _prefix("64M-postcopy-recover-pause-cap16M/capture-resume/conn0.d2s.bin.xz", 4000)
LAYOUT = RamLayout(blocks=(RamBlockLayout(idstr="pc.ram", used_length=0x4000000),
                           RamBlockLayout(idstr="/rom@etc/acpi/tables", used_length=0x20000),
                           RamBlockLayout(idstr="pc.bios", used_length=0x40000),
                           RamBlockLayout(idstr="pc.rom", used_length=0x20000),
                           RamBlockLayout(idstr="/rom@etc/table-loader", used_length=0x1000),
                           RamBlockLayout(idstr="/rom@etc/acpi/rsdp", used_length=0x1000)), section_id=2)


@st.composite
def mutated(draw, base: bytes):
    data = bytearray(base[: draw(st.integers(0, len(base)))])
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(("flip", "insert", "delete", "set")))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from((0, 0x7E, 0x08, 0xFF, 0x10, 0x20)))
        elif op == "insert":
            data[at:at] = draw(st.binary(max_size=12))
        elif data:
            del data[at : at + draw(st.integers(1, 64))]
    return bytes(data)


def _run(make, data: bytes, byte_at_a_time: bool) -> None:
    dec = make()
    try:
        if byte_at_a_time:
            for i in range(len(data)):
                dec.receive_data(data[i : i + 1])
                while not isinstance(dec.next_event(), NeedData):
                    pass
        elif data:
            dec.receive_data(data)
        dec.receive_data(b"")
        for _ in range(100000):
            ev = dec.next_event()
            assert not isinstance(ev, NeedData)
            if isinstance(ev, ConnectionClosed):
                return
        raise AssertionError("decoder did not finish")
    except RemoteProtocolError as exc:
        error = exc
    # the only other outcome: a protocol error with a kind and a message
    assert error.kind in ERROR_KINDS
    assert str(error)


DECODERS = {
    "main": (lambda: MainStreamDecoder(), MAIN),
    "recovery": (lambda: MainStreamDecoder(recovery=True, layout=LAYOUT), RESUME),
    "preempt": (lambda: PreemptDecoder(layout=LAYOUT), PREEMPT),
    "return_path": (lambda: ReturnPathDecoder(layout=LAYOUT), RP),
}


@FUZZ
@given(st.sampled_from(sorted(DECODERS)), st.data())
def test_mutated_captures_whole_buffer(name, data):
    make, base = DECODERS[name]
    _run(make, data.draw(mutated(base)), byte_at_a_time=False)


@FUZZ
@given(st.sampled_from(sorted(DECODERS)), st.data())
def test_mutated_capture_prefixes_byte_at_a_time(name, data):
    make, base = DECODERS[name]
    _run(make, data.draw(mutated(base[:1500])), byte_at_a_time=True)


@FUZZ
@given(st.sampled_from(sorted(DECODERS)), st.binary(max_size=300))
def test_arbitrary_bytes(name, blob):
    make, _ = DECODERS[name]
    _run(make, blob, byte_at_a_time=False)
    _run(make, blob, byte_at_a_time=True)


# ---------------------------------------------------------------- C vs Python scanner

TPS = 1024
BLOCKS = [(b"pc.ram", 16 * TPS, 4 * TPS), (b"rom", 2 * TPS, TPS), (b"x" * 40, 8 * TPS, 8 * TPS)]
FLAGS = (0x2, 0x8, 0x22, 0x28, 0x10, 0x4, 0x40, 0x80, 0x100, 0x200, 0x1, 0xA, 0x30, 0x3FF)


@st.composite
def record_stream(draw):
    out = bytearray()
    for _ in range(draw(st.integers(0, 12))):
        flags = draw(st.sampled_from(FLAGS))
        offset = draw(st.integers(0, 20)) * TPS
        out += struct.pack(">Q", offset | flags)
        if not flags & 0x20 and flags != 0x10:
            name = draw(st.sampled_from([b[0] for b in BLOCKS] + [b"", b"nope"]))
            out += bytes((len(name),)) + name
        if flags & 0x2:
            out += bytes((draw(st.sampled_from((0, 0, 1))),))
        elif flags & 0x8:
            out += bytes(TPS)
    data = bytearray(out)
    for _ in range(draw(st.integers(0, 2))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] ^= 0xFF
    return bytes(data[: draw(st.integers(0, len(data)))])


@settings(max_examples=300, deadline=2000)
@given(record_stream(), st.booleans(), st.integers(1, 20), st.integers(-1, 2))
def test_c_scanner_matches_python_reference(buf, postcopy, max_out, last_block):
    c = c_scanner().channel(BLOCKS, target_page_size=TPS, postcopy=postcopy)
    c._state.last_block = last_block  # type: ignore[attr-defined]
    ref = RefScanState(target_page_size=TPS, postcopy=postcopy, last_block=last_block)
    pos = 0
    for _ in range(50):  # resume after FULL / EOS like the decoders do
        got = c.scan(buf[pos:], max_out)
        want = ref_scan(ref, BLOCKS, buf[pos:], max_out)
        assert got == want
        assert c.state_tuple() == ref.state_tuple()
        consumed, status = got[0], got[1]
        if status < 0 or (status == 0) or (consumed == 0 and status != 2):
            break
        pos += consumed
