"""The C record scanner (``uffd/csrc/ramscan.c``): the codec's only user of the compiled core.

Imported only when a scanner is asked for (``c_scanner()`` / ``default_scanner()``),
never by ``import postcopy.wire``.  Every ``lib`` call releases the GIL; page data
is never touched from Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from uffd._native import ffi, lib

from ._scanner import MAX_BATCH, BlockSpec, BytesLike, encode_error

__all__ = ["C_SCANNER", "CChannelScanner", "CRecordScanner"]


class _BlockTable:
    """A C ``pc_ram_block_info[]`` kept alive with its idstr buffers."""

    def __init__(self, blocks: Sequence[BlockSpec]) -> None:
        self._names = [ffi.new("char[]", name) for name, _, _ in blocks]
        self.n = len(blocks)
        self.c = ffi.new("pc_ram_block_info[]", max(1, self.n))
        for i, (name, used, hps) in enumerate(blocks):
            self.c[i].idstr = self._names[i]
            self.c[i].idlen = len(name)
            self.c[i].used_length = used
            self.c[i].host_page_size = hps


class CChannelScanner:
    """Per-channel C scan state over one layout."""

    def __init__(
        self, blocks: Sequence[BlockSpec], *, target_page_size: int, postcopy: bool
    ) -> None:
        self._table = _BlockTable(blocks)
        self._state: Any = ffi.new("pc_ram_scan_state *")
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
        return (int(st.last_block), int(st.hp_block), int(st.hp_base), int(st.hp_count))

    def scan(self, buf: BytesLike, max_out: int = MAX_BATCH) -> tuple[int, int, bytes, int]:
        cbuf = ffi.from_buffer("uint8_t[]", buf)
        consumed = lib.pc_ram_scan(
            self._state,
            self._table.c,
            self._table.n,
            cbuf,
            len(buf),
            self._out,
            min(max_out, MAX_BATCH),
            self._nrec,
            self._status,
            self._err_pos,
        )
        n = self._nrec[0]
        records = ffi.buffer(self._out, n * ffi.sizeof("pc_ram_record"))[:] if n else b""
        return int(consumed), int(self._status[0]), records, int(self._err_pos[0])


@lru_cache(maxsize=64)
def _table_for(names: tuple[str, ...]) -> _BlockTable:
    # Encoding needs only names; sizes are irrelevant to the wire form.
    return _BlockTable([(n.encode("utf-8", "surrogateescape"), 0, 0) for n in names])


class CRecordScanner:
    """Scanning, counting and encoding of page records in C."""

    @property
    def name(self) -> str:
        return "c"

    def channel(
        self, blocks: Sequence[BlockSpec], *, target_page_size: int, postcopy: bool
    ) -> CChannelScanner:
        return CChannelScanner(blocks, target_page_size=target_page_size, postcopy=postcopy)

    def tally(self, records: bytes, nblocks: int) -> list[tuple[int, int]]:
        counts = ffi.new("uint64_t[]", 2 * max(1, nblocks))
        n = len(records) // ffi.sizeof("pc_ram_record")
        if n:
            lib.pc_ram_tally(ffi.from_buffer("pc_ram_record[]", records), n, counts, nblocks)
        return [(int(counts[2 * i]), int(counts[2 * i + 1])) for i in range(nblocks)]

    def encode(
        self, blocks: tuple[str, ...], target_page_size: int, records: bytes, data: BytesLike
    ) -> bytes:
        n = len(records) // ffi.sizeof("pc_ram_record")
        if n == 0:
            return b""
        table = _table_for(blocks)
        crec = ffi.from_buffer("pc_ram_record[]", records)
        cdata = ffi.from_buffer("uint8_t[]", data) if len(data) else ffi.NULL
        err_index = ffi.new("uint32_t *")
        size = lib.pc_ram_encode(
            table.c, table.n, target_page_size, crec, n, cdata, len(data), ffi.NULL, 0, err_index
        )
        if size >= 0:
            out = bytearray(size)
            size = lib.pc_ram_encode(
                table.c,
                table.n,
                target_page_size,
                crec,
                n,
                cdata,
                len(data),
                ffi.from_buffer(out),
                size,
                err_index,
            )
            if size >= 0:
                return bytes(out)
        raise encode_error(int(size), int(err_index[0]))


C_SCANNER = CRecordScanner()
