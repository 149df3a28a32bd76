"""Pure-Python reference of the C RAM record scanner (``uffd/csrc/ramscan.c``).

Same inputs, same results, same state changes: the differential test runs
both over random and mutated record streams.  Slow by design; not used on the
bulk path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ._events import RAM_RECORD, REC_PAGE, REC_ZERO

__all__ = ["RefScanState", "ref_scan"]

NEED_DATA, EOS, FULL = 0, 1, 2
(E_UNKNOWN_BLOCK, E_NO_BLOCK, E_OFFSET, E_FLAGS, E_MEM_SIZE, E_XBZRLE, E_COMPRESS, E_HOOK,
 E_MULTIFD_FLUSH, E_ZERO_FILL, E_EOS_OFFSET, E_EMPTY_IDSTR, E_HOST_PAGE, E_ARGS) = range(-1, -15, -1)

F_ZERO, F_MEM_SIZE, F_PAGE, F_EOS, F_CONTINUE = 0x2, 0x4, 0x8, 0x10, 0x20
_FLAG_ERRORS = {0x4: E_MEM_SIZE, 0x40: E_XBZRLE, 0x100: E_COMPRESS, 0x80: E_HOOK, 0x200: E_MULTIFD_FLUSH}


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


def ref_scan(st: RefScanState, blocks: Sequence[tuple[bytes, int, int]], buf: bytes,
             max_out: int) -> tuple[int, int, bytes, int]:
    """Returns (consumed, status, packed records, err_pos), like ``RamScanner.scan``."""
    tps = st.target_page_size
    if tps < 1024 or tps & (tps - 1):
        return 0, E_ARGS, b"", 0
    out: list[bytes] = []
    pos = 0
    n = len(buf)

    def fail(code: int, at: int) -> tuple[int, int, bytes, int]:
        return pos, code, b"".join(out), at

    while True:
        start = pos
        if n - pos < 8:
            return pos, NEED_DATA, b"".join(out), 0
        word = int.from_bytes(buf[pos : pos + 8], "big")
        flags = word & (tps - 1)
        offset = word & ~(tps - 1)
        if flags == F_EOS:
            if offset:
                return fail(E_EOS_OFFSET, start)
            return pos + 8, EOS, b"".join(out), 0
        base = flags & ~F_CONTINUE
        if base not in (F_ZERO, F_PAGE):
            return fail(_FLAG_ERRORS.get(base, E_FLAGS), start)
        if len(out) == max_out:
            return pos, FULL, b"".join(out), 0
        p = start + 8
        if flags & F_CONTINUE:
            blk = st.last_block
            if blk < 0:
                return fail(E_NO_BLOCK, start)
            had = 0
        else:
            if n - p < 1:
                return pos, NEED_DATA, b"".join(out), 0
            idlen = buf[p]
            if idlen == 0:
                return fail(E_EMPTY_IDSTR, start)
            if n - p - 1 < idlen:
                return pos, NEED_DATA, b"".join(out), 0
            name = bytes(buf[p + 1 : p + 1 + idlen])
            found = [i for i, b in enumerate(blocks) if b[0] == name]
            if not found:
                return fail(E_UNKNOWN_BLOCK, start)
            blk = found[0]
            p += 1 + idlen
            had = 1
        _, used, hps = blocks[blk]
        if offset >= used:
            return fail(E_OFFSET, start)
        huge = st.postcopy and hps > tps
        hp_base = offset & ~(hps - 1) if huge else 0
        if huge and st.hp_count > 0 and (st.hp_block != blk or st.hp_base != hp_base):
            return fail(E_HOST_PAGE, start)
        body = 1 if base == F_ZERO else tps
        if n - p < body:
            return pos, NEED_DATA, b"".join(out), 0
        fill = 0
        if base == F_ZERO:
            fill = buf[p]
            if fill:
                return fail(E_ZERO_FILL, start)
        out.append(RAM_RECORD.pack(offset, p, blk, REC_ZERO if base == F_ZERO else REC_PAGE, had, fill, 0))
        st.last_block = blk
        if huge:
            if st.hp_count == 0:
                st.hp_block, st.hp_base = blk, hp_base
            st.hp_count += 1
            if st.hp_count == hps // tps:
                st.hp_count, st.hp_block = 0, -1
        pos = p + body
