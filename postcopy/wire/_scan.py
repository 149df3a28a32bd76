"""The only importer of the C core here: RAM record scanning, tallying, encoding.

Every ``lib`` call releases the GIL; page data is never touched from Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from uffd._native import ffi, lib

from ._errors import LocalProtocolError

__all__ = ["SCAN_EOS", "SCAN_FULL", "SCAN_NEED_DATA", "RamScanner", "ScanError", "encode_records", "tally"]

SCAN_NEED_DATA: int = lib.PC_SCAN_NEED_DATA
SCAN_EOS: int = lib.PC_SCAN_EOS
SCAN_FULL: int = lib.PC_SCAN_FULL

#: Scanner error code -> (kind, description).
SCAN_ERRORS: dict[int, tuple[str, str]] = {
    lib.PC_SCAN_E_UNKNOWN_BLOCK: ("unknown_block", "page record names an unknown RAM block"),
    lib.PC_SCAN_E_NO_BLOCK: ("no_previous_block", "CONTINUE page record with no block named before on this channel"),
    lib.PC_SCAN_E_OFFSET: ("offset_out_of_block", "page offset is outside its block"),
    lib.PC_SCAN_E_FLAGS: ("bad_flags", "record flags are not exactly one of ZERO/PAGE (+CONTINUE) or EOS "
                          "(the low bits of the offset word are flags, so an unaligned offset shows up here)"),
    lib.PC_SCAN_E_MEM_SIZE: ("mem_size", "MEM_SIZE record outside the RAM setup"),
    lib.PC_SCAN_E_XBZRLE: ("xbzrle", "XBZRLE page record: only precopy with the xbzrle capability sends it, "
                           "and this codec does not decode it"),
    lib.PC_SCAN_E_COMPRESS: ("compressed_page", "COMPRESS_PAGE record (old compress capability) is not supported"),
    lib.PC_SCAN_E_HOOK: ("ram_hook", "RAM_SAVE_FLAG_HOOK record (RDMA only) is not supported"),
    lib.PC_SCAN_E_MULTIFD_FLUSH: ("multifd_flush", "MULTIFD_FLUSH record (multifd only) is not supported"),
    lib.PC_SCAN_E_ZERO_FILL: ("bad_value", "ZERO page record with a non-zero fill byte"),
    lib.PC_SCAN_E_EOS_OFFSET: ("eos_offset", "EOS record with non-zero offset bits"),
    lib.PC_SCAN_E_EMPTY_IDSTR: ("empty_idstr", "page record with an empty block idstr"),
    lib.PC_SCAN_E_HOST_PAGE: ("host_page_split", "postcopy page record starts another host page before the "
                              "current one is complete"),
    lib.PC_SCAN_E_ARGS: ("target_page_size", "target page size is not a power of two >= 1 KiB"),
}

#: Records per RamPages event: large enough that per-event Python is noise.
MAX_BATCH = 16384


class ScanError(Exception):
    """Raised by the scanner wrappers with the C error code and position."""

    def __init__(self, code: int, pos: int) -> None:
        super().__init__(code, pos)
        self.code = code
        self.pos = pos


class _BlockTable:
    """A C ``pc_ram_block_info[]`` kept alive with its idstr buffers."""

    def __init__(self, blocks: Sequence[tuple[bytes, int, int]]) -> None:
        self._names = [ffi.new("char[]", name) for name, _, _ in blocks]
        self.n = len(blocks)
        self.c = ffi.new("pc_ram_block_info[]", max(1, self.n))
        for i, (name, used, hps) in enumerate(blocks):
            self.c[i].idstr = self._names[i]
            self.c[i].idlen = len(name)
            self.c[i].used_length = used
            self.c[i].host_page_size = hps


class RamScanner:
    """Per-channel scanner state (``last_block`` survives section ends) over one layout."""

    def __init__(self, blocks: Sequence[tuple[bytes, int, int]], *, target_page_size: int,
                 postcopy: bool) -> None:
        self._table = _BlockTable(blocks)
        self._state = ffi.new("pc_ram_scan_state *")
        lib.pc_ram_scan_init(self._state, target_page_size, 1 if postcopy else 0)
        self._out = ffi.new("pc_ram_record[]", MAX_BATCH)
        self._nrec = ffi.new("uint32_t *")
        self._status = ffi.new("int32_t *")
        self._err_pos = ffi.new("uint64_t *")

    @property
    def postcopy(self) -> bool:
        return bool(self._state.postcopy)

    @postcopy.setter
    def postcopy(self, value: bool) -> None:
        self._state.postcopy = 1 if value else 0

    @property
    def last_block(self) -> int:
        return int(self._state.last_block)

    def state_tuple(self) -> tuple[int, int, int, int]:
        st = self._state
        return (st.last_block, st.hp_block, st.hp_base, st.hp_count)

    def scan(self, buf: Any, max_out: int = MAX_BATCH) -> tuple[int, int, bytes, int]:
        """Scan ``buf`` (bytes-like).  Returns (consumed, status, records, err_pos)."""
        cbuf = ffi.from_buffer("uint8_t[]", buf)
        consumed = lib.pc_ram_scan(self._state, self._table.c, self._table.n, cbuf, len(buf),
                                   self._out, min(max_out, MAX_BATCH), self._nrec, self._status,
                                   self._err_pos)
        n = self._nrec[0]
        records = ffi.buffer(self._out, n * ffi.sizeof("pc_ram_record"))[:] if n else b""
        return int(consumed), int(self._status[0]), records, int(self._err_pos[0])


def tally(records: bytes, nblocks: int) -> list[tuple[int, int]]:
    """(normal, zero) page-record counts per block index, counted in C."""
    counts = ffi.new("uint64_t[]", 2 * max(1, nblocks))
    n = len(records) // ffi.sizeof("pc_ram_record")
    if n:
        lib.pc_ram_tally(ffi.from_buffer("pc_ram_record[]", records), n, counts, nblocks)
    return [(int(counts[2 * i]), int(counts[2 * i + 1])) for i in range(nblocks)]


@lru_cache(maxsize=64)
def _table_for(names: tuple[str, ...]) -> _BlockTable:
    # Encoding needs only names; sizes are irrelevant to the wire form.
    return _BlockTable([(n.encode("utf-8", "surrogateescape"), 0, 0) for n in names])


_ENCODE_ERRORS = {
    lib.PC_ENC_E_BLOCK: "names a block index outside blocks",
    lib.PC_ENC_E_DATA_POS: "points its page data outside buffer",
    lib.PC_ENC_E_KIND: "has a kind that is neither ZERO nor PAGE",
    lib.PC_ENC_E_SPACE: "does not fit the output",
    lib.PC_ENC_E_CONTINUE: "is a CONTINUE record for a block other than the previous record's",
    lib.PC_ENC_E_IDSTR: "names a block whose idstr is not 1..255 bytes",
}


def encode_records(blocks: tuple[str, ...], target_page_size: int, records: bytes, data: Any) -> bytes:
    """The wire form of packed records, built in C."""
    n = len(records) // ffi.sizeof("pc_ram_record")
    if n == 0:
        return b""
    table = _table_for(blocks)
    crec = ffi.from_buffer("pc_ram_record[]", records)
    cdata = ffi.from_buffer("uint8_t[]", data) if len(data) else ffi.NULL
    err_index = ffi.new("uint32_t *")
    size = lib.pc_ram_encode(table.c, table.n, target_page_size, crec, n, cdata, len(data),
                             ffi.NULL, 0, err_index)
    if size >= 0:
        out = bytearray(size)
        size = lib.pc_ram_encode(table.c, table.n, target_page_size, crec, n, cdata, len(data),
                                 ffi.from_buffer(out), size, err_index)
        if size >= 0:
            return bytes(out)
    raise LocalProtocolError(
        f"RamPages record {err_index[0]} {_ENCODE_ERRORS.get(size, f'failed with code {size}')}",
        kind="bad_value",
    )
