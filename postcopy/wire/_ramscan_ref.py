"""Pure-Python reference of the C record scanner (``uffd/csrc/ramscan.c``): ``PYTHON_SCANNER``.

Same inputs, same results, same state changes: the differential tests run
both over random and mutated record streams and over the QEMU captures.  It is
the codec's fallback when the compiled core is not built; slow by design (one
Python step per record), so the bulk paths use the C scanner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ._constants import (
    RAM_FLAG_COMPRESS_PAGE,
    RAM_FLAG_CONTINUE,
    RAM_FLAG_EOS,
    RAM_FLAG_HOOK,
    RAM_FLAG_MEM_SIZE,
    RAM_FLAG_MULTIFD_FLUSH,
    RAM_FLAG_PAGE,
    RAM_FLAG_XBZRLE,
    RAM_FLAG_ZERO,
)
from ._events import RAM_RECORD, REC_PAGE, REC_ZERO
from ._scanner import (
    ENC_E_BLOCK,
    ENC_E_CONTINUE,
    ENC_E_DATA_POS,
    ENC_E_IDSTR,
    ENC_E_KIND,
    MAX_BATCH,
    SCAN_E_ARGS,
    SCAN_E_COMPRESS,
    SCAN_E_EMPTY_IDSTR,
    SCAN_E_EOS_OFFSET,
    SCAN_E_FLAGS,
    SCAN_E_HOOK,
    SCAN_E_HOST_PAGE,
    SCAN_E_MEM_SIZE,
    SCAN_E_MULTIFD_FLUSH,
    SCAN_E_NO_BLOCK,
    SCAN_E_OFFSET,
    SCAN_E_UNKNOWN_BLOCK,
    SCAN_E_XBZRLE,
    SCAN_E_ZERO_FILL,
    SCAN_EOS,
    SCAN_FULL,
    SCAN_NEED_DATA,
    BlockSpec,
    BytesLike,
    encode_error,
)

__all__ = ["PYTHON_SCANNER", "PyChannelScanner", "PyRecordScanner", "RefScanState", "ref_scan"]

_FLAG_ERRORS = {
    RAM_FLAG_MEM_SIZE: SCAN_E_MEM_SIZE,
    RAM_FLAG_XBZRLE: SCAN_E_XBZRLE,
    RAM_FLAG_COMPRESS_PAGE: SCAN_E_COMPRESS,
    RAM_FLAG_HOOK: SCAN_E_HOOK,
    RAM_FLAG_MULTIFD_FLUSH: SCAN_E_MULTIFD_FLUSH,
}


@dataclass
class RefScanState:
    target_page_size: int = 4096
    postcopy: bool = False
    last_block: int = -1
    hp_block: int = -1
    hp_base: int = 0
    hp_count: int = 0

    def state_tuple(self) -> tuple[int, int, int, int]:
        return (self.last_block, self.hp_block, self.hp_base, self.hp_count)


def ref_scan(
    st: RefScanState, blocks: Sequence[BlockSpec], buf: BytesLike, max_out: int
) -> tuple[int, int, bytes, int]:
    """Returns (consumed, status, packed records, err_pos), like ``ChannelScanner.scan``."""
    tps = st.target_page_size
    if tps < 1024 or tps & (tps - 1):
        return 0, SCAN_E_ARGS, b"", 0
    out: list[bytes] = []
    pos = 0
    n = len(buf)
    index = {b[0]: i for i, b in reversed(list(enumerate(blocks)))}  # the first of equal names

    def fail(code: int, at: int) -> tuple[int, int, bytes, int]:
        return pos, code, b"".join(out), at

    while True:
        start = pos
        if n - pos < 8:
            return pos, SCAN_NEED_DATA, b"".join(out), 0
        word = int.from_bytes(buf[pos : pos + 8], "big")
        flags = word & (tps - 1)
        offset = word & ~(tps - 1)
        if flags == RAM_FLAG_EOS:
            if offset:
                return fail(SCAN_E_EOS_OFFSET, start)
            return pos + 8, SCAN_EOS, b"".join(out), 0
        base = flags & ~RAM_FLAG_CONTINUE
        if base not in (RAM_FLAG_ZERO, RAM_FLAG_PAGE):
            return fail(_FLAG_ERRORS.get(base, SCAN_E_FLAGS), start)
        if len(out) == max_out:
            return pos, SCAN_FULL, b"".join(out), 0
        p = start + 8
        if flags & RAM_FLAG_CONTINUE:
            blk = st.last_block
            if blk < 0:
                return fail(SCAN_E_NO_BLOCK, start)
            had = 0
        else:
            if n - p < 1:
                return pos, SCAN_NEED_DATA, b"".join(out), 0
            idlen = buf[p]
            if idlen == 0:
                return fail(SCAN_E_EMPTY_IDSTR, start)
            if n - p - 1 < idlen:
                return pos, SCAN_NEED_DATA, b"".join(out), 0
            found = index.get(bytes(buf[p + 1 : p + 1 + idlen]))
            if found is None:
                return fail(SCAN_E_UNKNOWN_BLOCK, start)
            blk = found
            p += 1 + idlen
            had = 1
        _, used, hps = blocks[blk]
        if offset >= used:
            return fail(SCAN_E_OFFSET, start)
        huge = st.postcopy and hps > tps
        hp_base = offset & ~(hps - 1) if huge else 0
        if huge and st.hp_count > 0 and (st.hp_block != blk or st.hp_base != hp_base):
            return fail(SCAN_E_HOST_PAGE, start)
        body = 1 if base == RAM_FLAG_ZERO else tps
        if n - p < body:
            return pos, SCAN_NEED_DATA, b"".join(out), 0
        fill = 0
        if base == RAM_FLAG_ZERO:
            fill = buf[p]
            if fill:
                return fail(SCAN_E_ZERO_FILL, start)
        out.append(
            RAM_RECORD.pack(
                offset, p, blk, REC_ZERO if base == RAM_FLAG_ZERO else REC_PAGE, had, fill, 0
            )
        )
        st.last_block = blk
        if huge:
            if st.hp_count == 0:
                st.hp_block, st.hp_base = blk, hp_base
            st.hp_count += 1
            if st.hp_count == hps // tps:
                st.hp_count, st.hp_block = 0, -1
        pos = p + body


class PyChannelScanner:
    """Per-channel scan state of the reference scanner."""

    def __init__(
        self, blocks: Sequence[BlockSpec], *, target_page_size: int, postcopy: bool
    ) -> None:
        self._blocks = tuple(blocks)
        self.state = RefScanState(target_page_size=target_page_size, postcopy=postcopy)

    @property
    def postcopy(self) -> bool:
        return self.state.postcopy

    @postcopy.setter
    def postcopy(self, value: bool) -> None:
        self.state.postcopy = bool(value)

    @property
    def last_block(self) -> int:
        return self.state.last_block

    def state_tuple(self) -> tuple[int, int, int, int]:
        return self.state.state_tuple()

    def scan(self, buf: BytesLike, max_out: int = MAX_BATCH) -> tuple[int, int, bytes, int]:
        return ref_scan(self.state, self._blocks, buf, min(max_out, MAX_BATCH))


def ref_tally(records: bytes, nblocks: int) -> list[tuple[int, int]]:
    counts = [[0, 0] for _ in range(nblocks)]
    for _, _, blk, kind, _, _, _ in RAM_RECORD.iter_unpack(records):
        if blk < nblocks:
            counts[blk][1 if kind == REC_ZERO else 0] += 1
    return [(normal, zero) for normal, zero in counts]


def ref_encode(
    blocks: tuple[str, ...], target_page_size: int, records: bytes, data: BytesLike
) -> bytes:
    tps = target_page_size
    names = [b.encode("utf-8", "surrogateescape") for b in blocks]
    out = bytearray()
    last = -1
    for i, (offset, data_pos, blk, kind, had, fill, _) in enumerate(
        RAM_RECORD.iter_unpack(records)
    ):
        if blk >= len(names):
            raise encode_error(ENC_E_BLOCK, i)
        if kind not in (REC_ZERO, REC_PAGE):
            raise encode_error(ENC_E_KIND, i)
        if not had and last >= 0 and last != blk:
            raise encode_error(ENC_E_CONTINUE, i)
        name = names[blk]
        if had and not 1 <= len(name) <= 255:
            raise encode_error(ENC_E_IDSTR, i)
        if kind == REC_PAGE and (data_pos > len(data) or len(data) - data_pos < tps):
            raise encode_error(ENC_E_DATA_POS, i)
        flags = (RAM_FLAG_ZERO if kind == REC_ZERO else RAM_FLAG_PAGE) | (
            0 if had else RAM_FLAG_CONTINUE
        )
        out += ((offset & ~(tps - 1)) | flags).to_bytes(8, "big")
        if had:
            out.append(len(name))
            out += name
        if kind == REC_ZERO:
            out.append(fill)
        else:
            out += data[data_pos : data_pos + tps]
        last = blk
    return bytes(out)


class PyRecordScanner:
    """Scanning, counting and encoding of page records in pure Python."""

    @property
    def name(self) -> str:
        return "python"

    def channel(
        self, blocks: Sequence[BlockSpec], *, target_page_size: int, postcopy: bool
    ) -> PyChannelScanner:
        return PyChannelScanner(blocks, target_page_size=target_page_size, postcopy=postcopy)

    def tally(self, records: bytes, nblocks: int) -> list[tuple[int, int]]:
        return ref_tally(records, nblocks)

    def encode(
        self, blocks: tuple[str, ...], target_page_size: int, records: bytes, data: BytesLike
    ) -> bytes:
        return ref_encode(blocks, target_page_size, records, data)


PYTHON_SCANNER = PyRecordScanner()
