"""Page-record runs shared by the main and preempt decoders: bulk scan, one event per batch."""

from __future__ import annotations

from ._constants import RAM_FLAG_CONTINUE, RAM_FLAG_PAGE, RAM_FLAG_ZERO
from ._decoder import BaseDecoder, NeedData, Short, describe_bytes
from ._errors import LocalProtocolError
from ._events import RamEos, RamLayout, RamPages
from ._scanner import SCAN_EOS, SCAN_ERRORS, RecordScanner

__all__ = ["RamRecordReader"]

#: idstr + header + a whole page: the most one record can need contiguously.
_MAX_RECORD = 8 + 1 + 255 + 65536


class RamRecordReader:
    """Reads runs of page records for one channel until EOS, with ``scanner``'s channel state."""

    def __init__(self, layout: RamLayout, channel: int, *, postcopy: bool, scanner: RecordScanner) -> None:
        self.layout = layout
        self.channel = channel
        blocks = [(b.idstr.encode("utf-8", "surrogateescape"), b.used_length, b.host_page_size)
                  for b in layout.blocks]
        self.scanner = scanner.channel(blocks, target_page_size=layout.target_page_size, postcopy=postcopy)
        self._names = tuple(b.idstr for b in layout.blocks)

    def step(self, dec: BaseDecoder) -> RamPages | RamEos | NeedData:
        """Scan at the front of ``dec``'s buffer.  EOS after records is queued on ``dec._pending``."""
        buf = dec._buf
        while True:
            view = buf.front()
            consumed, status, records, err_pos = self.scanner.scan(view)
            if status < 0:
                raise self._error(dec, view, status, err_pos)
            if records or status == SCAN_EOS:
                break
            # An incomplete record at the front: once it can be complete, join it with
            # what follows; until then do not look again (no rescan per short read).
            join = len(view) + _MAX_RECORD
            if len(buf) < join:  # (no need to ask when a whole record of any kind is there)
                need = self._record_length(view)
                if need <= len(view):  # cannot happen for a valid record; just look again later
                    need = len(view) + 1
                if len(buf) < need:
                    dec._expecting = "RAM page record"
                    raise Short(need)
                join = max(need, len(buf))
            buf.peek(join)
        end = consumed - 8 if status == SCAN_EOS else consumed
        event = RamPages(channel=self.channel, blocks=self._names, records=records,
                         buffer=view[:end], target_page_size=self.layout.target_page_size) if records else None
        buf.consume(consumed)
        if status == SCAN_EOS:
            if event is None:
                return RamEos()
            dec._pending.append(RamEos())
        assert event is not None
        return event

    def _record_length(self, head: memoryview) -> int:
        """Bytes the record starting ``head`` needs (a lower bound while its header is incomplete)."""
        if len(head) < 8:
            return 8
        tps = self.layout.target_page_size
        flags = int.from_bytes(head[:8], "big") & (tps - 1)
        n = 8
        if flags & (RAM_FLAG_PAGE | RAM_FLAG_ZERO) and not flags & RAM_FLAG_CONTINUE:
            if len(head) < 9:
                return 9
            n = 9 + head[8]
        if flags & RAM_FLAG_PAGE:
            n += tps
        elif flags & RAM_FLAG_ZERO:
            n += 1
        return n

    def _error(self, dec: BaseDecoder, view: memoryview, code: int, pos: int) -> LocalProtocolError:
        kind, what = SCAN_ERRORS.get(code, ("bad_value", f"scanner error {code}"))
        tps = self.layout.target_page_size
        detail = ""
        rec = view[pos:]
        if len(rec) >= 8:
            word = int.from_bytes(rec[:8], "big")
            offset, flags = word & ~(tps - 1), word & (tps - 1)
            detail = f": offset {offset:#x}, flags {flags:#x}"
            name = None
            if not flags & RAM_FLAG_CONTINUE and len(rec) > 9 and len(rec) >= 9 + rec[8]:
                name = bytes(rec[9 : 9 + rec[8]]).decode("utf-8", "surrogateescape")
            elif self.scanner.last_block >= 0:
                name = self._names[self.scanner.last_block]
            if name is not None:
                block = self.layout.block(name)
                detail += f", block {name!r}"
                if block is not None and kind == "offset_out_of_block":
                    detail += f" of used_length {block.used_length:#x}"
                if kind == "unknown_block":
                    detail += f" (known blocks: {', '.join(self._names) or 'none'})"
        else:
            detail = f": {describe_bytes(rec)}"
        return dec._fail(kind, f"channel {self.channel}: {what}{detail}", pos)


