"""The C core's copy of QEMU's framing agrees with the wire codec's.

The C data path (dest.c, source.c, ramscan.c) writes and parses section
bytes, commands, return-path messages and RAM flags itself; the sans-IO codec
has its own constants. A mismatch would only show as a corrupt stream.
"""

from __future__ import annotations

import pytest

from postcopy.wire import _constants as wc
from postcopy.wire import _scanner as sc
from postcopy.wire._events import RAM_RECORD, REC_PAGE, REC_ZERO
from uffd._native import ffi, lib

FRAMING = [
    ("PC_VM_SECTION_PART", wc.SectionType.PART),
    ("PC_VM_SECTION_END", wc.SectionType.END),
    ("PC_VM_SECTION_FOOTER", wc.SectionType.FOOTER),
    ("PC_VM_COMMAND", wc.SectionType.COMMAND),
    ("PC_MIG_CMD_PING", wc.Command.PING),
    ("PC_MIG_CMD_POSTCOPY_RAM_DISCARD", wc.Command.POSTCOPY_RAM_DISCARD),
    ("PC_RP_REQ_PAGES_ID", wc.RpMessage.REQ_PAGES_ID),
    ("PC_RP_REQ_PAGES", wc.RpMessage.REQ_PAGES),
    ("PC_RP_MAX_FRAME", wc.RP_MAX_FRAME_LENGTH),
    ("PC_RAM_FLAG_FULL", wc.RAM_FLAG_FULL),
    ("PC_RAM_FLAG_ZERO", wc.RAM_FLAG_ZERO),
    ("PC_RAM_FLAG_MEM_SIZE", wc.RAM_FLAG_MEM_SIZE),
    ("PC_RAM_FLAG_PAGE", wc.RAM_FLAG_PAGE),
    ("PC_RAM_FLAG_EOS", wc.RAM_FLAG_EOS),
    ("PC_RAM_FLAG_CONTINUE", wc.RAM_FLAG_CONTINUE),
    ("PC_RAM_FLAG_XBZRLE", wc.RAM_FLAG_XBZRLE),
    ("PC_RAM_FLAG_HOOK", wc.RAM_FLAG_HOOK),
    ("PC_RAM_FLAG_COMPRESS_PAGE", wc.RAM_FLAG_COMPRESS_PAGE),
    ("PC_RAM_FLAG_MULTIFD_FLUSH", wc.RAM_FLAG_MULTIFD_FLUSH),
    ("PC_TARGET_PAGE_SIZE", wc.DEFAULT_TARGET_PAGE_SIZE),
    ("PC_GUEST_TARGET_PAGE_SIZE", wc.DEFAULT_TARGET_PAGE_SIZE),
]

#: The record scanner's interface: statuses, error and encoder codes, record kinds.
SCANNER = [
    ("PC_REC_ZERO", REC_ZERO),
    ("PC_REC_PAGE", REC_PAGE),
    *(
        (name, getattr(sc, name.removeprefix("PC_")))
        for name in dir(lib)
        if name.startswith(("PC_SCAN_", "PC_ENC_E_"))
    ),
]


@pytest.mark.parametrize(
    ("c_name", "value"), FRAMING + SCANNER, ids=[n for n, _ in FRAMING + SCANNER]
)
def test_c_constant_equals_the_wire_constant(c_name: str, value: int) -> None:
    assert getattr(lib, c_name) == value


def test_every_scanner_code_is_compared() -> None:
    compared = {n for n, _ in SCANNER}
    assert len([n for n in compared if n.startswith("PC_SCAN_E_")]) == len(sc.SCAN_ERRORS)
    assert {"PC_SCAN_NEED_DATA", "PC_SCAN_EOS", "PC_SCAN_FULL", "PC_ENC_E_SPACE"} <= compared


def test_packed_record_layout_matches_pc_ram_record() -> None:
    assert ffi.sizeof("pc_ram_record") == RAM_RECORD.size
    fields = ("offset", "data_pos", "block", "kind", "had_idstr", "fill", "pad")
    offsets = [ffi.offsetof("pc_ram_record", f) for f in fields]
    assert offsets == [0, 8, 16, 20, 21, 22, 23]
    rec = ffi.new(
        "pc_ram_record *",
        {"offset": 0x1000, "data_pos": 7, "block": 3, "kind": REC_PAGE, "had_idstr": 1, "fill": 0},
    )
    assert RAM_RECORD.unpack(ffi.buffer(rec)[:]) == (0x1000, 7, 3, REC_PAGE, 1, 0, 0)


def test_the_sessions_heartbeat_tag_is_the_c_sources() -> None:
    from postcopy.session._destination import HEARTBEAT_MASK, HEARTBEAT_PING

    assert (HEARTBEAT_MASK, HEARTBEAT_PING) == (lib.PC_HEARTBEAT_MASK, lib.PC_HEARTBEAT_PING)
