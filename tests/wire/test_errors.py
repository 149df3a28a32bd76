"""Bad input gives RemoteProtocolError with a stable kind and a message naming the values."""

from __future__ import annotations

import struct

import pytest

from postcopy.wire import (
    LocalProtocolError,
    MainStreamDecoder,
    ProtocolError,
    RamBlockLayout,
    RamLayout,
    RemoteProtocolError,
    ReturnPathDecoder,
    PreemptDecoder,
)

HEAD = b"QEVM\0\0\0\x03" + b"\x07" + struct.pack(">I", 13) + b"pc-i440fx-7.2"
ADVISE = b"\x08\x00\x03\x00\x10" + struct.pack(">QQ", 0x1000, 0x1000)
RAM_START = b"\x01" + struct.pack(">I", 2) + b"\x03ram" + struct.pack(">II", 0, 4)
SETUP = struct.pack(">Q", 0x2000 | 4) + b"\x06pc.ram" + struct.pack(">Q", 0x2000) + struct.pack(">Q", 0x10)
FOOT = b"\x7e" + struct.pack(">I", 2)
PART = b"\x02" + struct.pack(">I", 2)
PREFIX = HEAD + ADVISE + RAM_START + SETUP + FOOT + PART
LAYOUT = RamLayout(blocks=(RamBlockLayout(idstr="pc.ram", used_length=0x2000),), section_id=2)


def _drain(dec) -> None:
    while type(dec.next_event()).__name__ != "ConnectionClosed":
        pass


def _fail(dec, data: bytes, eof: bool = True) -> RemoteProtocolError:
    dec.receive_data(data)
    if eof:
        dec.receive_data(b"")
    with pytest.raises(RemoteProtocolError) as info:
        _drain(dec)
    # refuses further input
    with pytest.raises(RemoteProtocolError):
        dec.next_event()
    with pytest.raises(LocalProtocolError):
        dec.receive_data(b"x")
    return info.value


def _rec(word: int, body: bytes = b"", idstr: bytes | None = b"pc.ram") -> bytes:
    return struct.pack(">Q", word) + (bytes((len(idstr),)) + idstr if idstr is not None else b"") + body


MAIN_CASES = [
    ("bad_magic", b"QEMU\0\0\0\x03", "51 45 4d 55"),
    ("bad_version", b"QEVM\0\0\0\x02", "version 2"),
    ("unknown_section_type", HEAD + b"\x09", "0x09"),
    ("unknown_command", HEAD + b"\x08\x00\x30\x00\x00", "48"),
    ("bad_length", HEAD + b"\x08\x00\x02\x00\x05" + b"\0" * 5, "PING has len 5, expected 4"),
    ("unknown_section", HEAD + b"\x02\x00\x00\x00\x07", "section id 7"),
    ("unsupported_section", HEAD + b"\x01\0\0\0\x03\x05block\0\0\0\0\0\0\0\x01", "'block'"),
    ("offset_out_of_block", PREFIX + _rec(0x2000 | 8, b"\0" * 4096), "0x2000"),
    ("unknown_block", PREFIX + _rec(0x1000 | 2, b"\0", b"vga.ram"), "'vga.ram'"),
    ("no_previous_block", PREFIX + _rec(0x1000 | 0x22, b"\0", None), "CONTINUE"),
    ("truncated", PREFIX + _rec(0x1000 | 8, b"\0" * 100), "incomplete RAM page record"),
    ("bad_flags", PREFIX + _rec(0x1000 | 0x0A, b"\0"), "flags 0xa"),
    ("xbzrle", PREFIX + _rec(0x1000 | 0x40, b"\0"), "XBZRLE"),
    ("bad_value", PREFIX + _rec(0x1000 | 2, b"\x05"), "non-zero fill"),
    ("eos_offset", PREFIX + _rec(0x1000 | 0x10, b"", None), "EOS"),
    ("bad_footer", HEAD + ADVISE + RAM_START + SETUP + b"\x7e\0\0\0\x03", "section 2"),
    ("packaged_too_large", HEAD + b"\x08\x00\x07\x00\x04" + struct.pack(">I", 300 << 20), "limit"),
    ("unaligned", HEAD + ADVISE + RAM_START + SETUP + FOOT + b"\x08\x00\x06\x00\x19\x00\x06pc.ram\x00"
     + struct.pack(">QQ", 0x10, 0x1000), "not aligned"),
    ("mem_size", HEAD + ADVISE + RAM_START + struct.pack(">Q", 0x1000 | 4) + b"\x06pc.ram"
     + struct.pack(">Q", 0x2000), "exceed"),
]


@pytest.mark.parametrize(("kind", "data", "needle"), MAIN_CASES, ids=[c[0] for c in MAIN_CASES])
def test_main_channel_errors(kind, data, needle):
    err = _fail(MainStreamDecoder(), data)
    assert err.kind == kind
    assert needle in str(err)
    assert err.offset is not None
    assert "stream offset" in str(err)


def test_packaged_limit_is_configurable_and_checked_before_buffering():
    dec = MainStreamDecoder(max_packaged_length=1000)
    err = _fail(dec, HEAD + b"\x08\x00\x07\x00\x04" + struct.pack(">I", 1001), eof=False)
    assert err.kind == "packaged_too_large"
    assert "1001" in str(err)
    assert "1000" in str(err)


def _bitmap_frame(idstr: bytes, size: int, mark: int = 0x0123456789ABCDEF, body: bytes | None = None) -> bytes:
    body = b"\0" * size if body is None else body
    return (struct.pack(">HH", 5, 1 + len(idstr)) + bytes((len(idstr),)) + idstr + struct.pack(">Q", size)
            + body + struct.pack(">Q", mark))


RP_CASES = [
    ("unknown_message", struct.pack(">HH", 9, 0), "type 9"),
    ("frame_too_large", struct.pack(">HH", 3, 600), "600"),
    ("bad_length", struct.pack(">HH", 2, 3) + b"\0\0\0", "PONG has len 3, expected 4"),
    ("bitmap_size", _bitmap_frame(b"pc.ram", 16), "needs 8"),
    ("bitmap_end_mark", _bitmap_frame(b"pc.ram", 8, mark=0x1122), "0x0000000000001122"),
    ("unknown_block", struct.pack(">HH", 3, 19) + struct.pack(">QI", 0, 4096) + b"\x06vg.ram", "'vg.ram'"),
    ("no_previous_block", struct.pack(">HH", 4, 12) + struct.pack(">QI", 0, 4096), "REQ_PAGES"),
    ("offset_out_of_block", struct.pack(">HH", 3, 19) + struct.pack(">QI", 0x2000, 4096) + b"\x06pc.ram",
     "0x2000"),
    ("unaligned", struct.pack(">HH", 3, 19) + struct.pack(">QI", 0x10, 4096) + b"\x06pc.ram", "aligned"),
    ("truncated", struct.pack(">HH", 2, 4) + b"\0", "incomplete"),
]


@pytest.mark.parametrize(("kind", "data", "needle"), RP_CASES, ids=[c[0] for c in RP_CASES])
def test_return_path_errors(kind, data, needle):
    err = _fail(ReturnPathDecoder(layout=LAYOUT), data)
    assert err.kind == kind
    assert needle in str(err)


def test_unknown_block_bitmap_is_bounded_without_layout():
    err = _fail(ReturnPathDecoder(), _bitmap_frame(b"x", 1 << 40, body=b""), eof=False)
    assert err.kind == "bitmap_size"
    assert str(1 << 40) in str(err)


def test_preempt_trailing_data_after_eos():
    err = _fail(PreemptDecoder(layout=LAYOUT), struct.pack(">Q", 0x10) + b"\0")
    assert err.kind == "trailing_data"


def test_protocol_error_is_abstract():
    with pytest.raises(TypeError):
        ProtocolError("x", kind="truncated")
