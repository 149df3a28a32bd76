"""Decoder of the return path (destination -> source, same socket as main)."""

from __future__ import annotations

import struct

from . import _events as ev
from ._constants import (
    DEFAULT_HOST_PAGE_SIZE,
    MAX_RECV_BITMAP_BYTES,
    RECV_BITMAP_END_MARK,
    RP,
    RP_FIXED_LENGTH,
    RP_MAX_FRAME_LENGTH,
    RpMessage,
)
from ._decoder import BE32, BE64, NEED_DATA, BaseDecoder, NeedData

__all__ = ["ReturnPathDecoder", "recv_bitmap_size"]


def recv_bitmap_size(used_length: int, target_page_size: int = 4096) -> int:
    """Bytes of a RECV_BITMAP body for a block: round_up(ceil(nbits / 8), 8)."""
    nbits = used_length // target_page_size
    return ((nbits + 7) // 8 + 7) // 8 * 8


#: message type -> (the message, its fixed length or None, what is being decoded)
_MESSAGES = {int(m): (m, RP_FIXED_LENGTH.get(m), f"return-path {m.name}") for m in RpMessage}


class ReturnPathDecoder(BaseDecoder):
    """RP frames ``be16 type, be16 len, data`` (len <= 512) and the RECV_BITMAP body.

    With a ``layout`` the page requests and bitmap sizes are checked against
    the blocks; without one, bitmap bodies are bounded by MAX_RECV_BITMAP_BYTES.
    ``page_size`` is the source's host page size, which requests must be aligned to.
    """

    def __init__(self, *, layout: ev.RamLayout | None = None,
                 page_size: int = DEFAULT_HOST_PAGE_SIZE) -> None:
        super().__init__()
        self.layout = layout
        self.page_size = page_size
        self._last_block: str | None = None

    def _block(self, idstr: str, what: str) -> ev.RamBlockLayout | None:
        if self.layout is None:
            return None
        block = self.layout.block(idstr)
        if block is None:
            raise self._fail("unknown_block", f"{what} names unknown block {idstr!r} (known: "
                             f"{', '.join(b.idstr for b in self.layout.blocks)})")
        return block

    def _step(self) -> ev.WireEvent | NeedData:
        if len(self._buf) == 0:
            return NEED_DATA
        self._expecting = "return-path frame header"
        typ, ln = struct.unpack(">HH", self._need(4))
        known = _MESSAGES.get(typ)
        if known is None:
            raise self._fail("unknown_message", f"unknown return-path message type {typ} (len {ln}); known: "
                             + ", ".join(f"{m.value} {m.name}" for m in RpMessage))
        msg, fixed, expecting = known
        if ln > RP_MAX_FRAME_LENGTH:
            raise self._fail("frame_too_large", f"return-path {msg.name} frame len {ln} exceeds "
                             f"{RP_MAX_FRAME_LENGTH}")
        if fixed is not None and ln != fixed:
            raise self._fail("bad_length", f"return-path {msg.name} has len {ln}, expected {fixed}")
        self._expecting = expecting
        p = bytes(self._need(4 + ln)[4:])
        if msg == RP.RECV_BITMAP:
            return self._recv_bitmap(p)
        event: ev.WireEvent
        if msg == RP.SHUT:
            event = ev.Shut(value=BE32.unpack(p)[0])
        elif msg == RP.PONG:
            event = ev.Pong(value=BE32.unpack(p)[0])
        elif msg == RP.RESUME_ACK:
            event = ev.ResumeAck(value=BE32.unpack(p)[0])
        elif msg == RP.SWITCHOVER_ACK:
            event = ev.SwitchoverAck()
        else:
            event = self._page_request(msg, p)
        self._buf.consume(4 + ln)
        return event

    def _page_request(self, msg: RpMessage, p: bytes) -> ev.WireEvent:
        idstr: str | None = None
        if msg == RP.REQ_PAGES_ID:
            if len(p) < 13 or len(p) != 13 + p[12]:
                raise self._fail("bad_length", f"REQ_PAGES_ID has len {len(p)}, expected 13 + idstr length")
            if p[12] == 0:
                raise self._fail("empty_idstr", "REQ_PAGES_ID with an empty idstr")
            idstr = p[13:].decode("utf-8", "surrogateescape")
            name = idstr
        else:
            if self._last_block is None:
                raise self._fail("no_previous_block", "REQ_PAGES before any REQ_PAGES_ID named a block")
            name = self._last_block
        start, length = struct.unpack_from(">QI", p)
        block = self._block(name, msg.name)
        if length == 0 or start % self.page_size or length % self.page_size:
            raise self._fail("unaligned", f"{msg.name} {name!r} {start:#x}+{length:#x} is empty or not "
                             f"aligned to the page size {self.page_size:#x}")
        if block is not None and start + length > block.used_length:
            raise self._fail("offset_out_of_block", f"{msg.name} {name!r} {start:#x}+{length:#x} runs past "
                             f"the block's used_length {block.used_length:#x}")
        self._last_block = name
        return ev.PageRequest(start=start, length=length, idstr=idstr)

    def _recv_bitmap(self, p: bytes) -> ev.WireEvent:
        if len(p) < 2 or p[0] != len(p) - 1:
            raise self._fail("bad_length" if p[:1] != b"\0" else "empty_idstr",
                             f"RECV_BITMAP has len {len(p)}, expected 1 + idstr length (>= 2)")
        idstr = p[1:].decode("utf-8", "surrogateescape")
        block = self._block(idstr, "RECV_BITMAP")
        head = 4 + len(p)
        self._expecting = f"RECV_BITMAP body for {idstr!r}"
        size = BE64.unpack_from(self._need(head + 8), head)[0]
        if block is not None:
            tps = self.layout.target_page_size if self.layout else 4096
            expected = recv_bitmap_size(block.used_length, tps)
            if size != expected:
                raise self._fail("bitmap_size", f"RECV_BITMAP for {idstr!r} announces {size} bytes; its "
                                 f"used_length {block.used_length:#x} needs {expected}", head)
        elif size > MAX_RECV_BITMAP_BYTES or size % 8:
            raise self._fail("bitmap_size", f"RECV_BITMAP for {idstr!r} announces {size} bytes: not a "
                             f"multiple of 8 or above the limit {MAX_RECV_BITMAP_BYTES}", head)
        view = self._need(head + 8 + size + 8)
        mark = BE64.unpack_from(view, head + 8 + size)[0]
        if mark != RECV_BITMAP_END_MARK:
            raise self._fail("bitmap_end_mark", f"RECV_BITMAP for {idstr!r} ends with {mark:#018x}, "
                             f"expected the end mark {RECV_BITMAP_END_MARK:#018x}", head + 8 + size)
        event = ev.RecvBitmap(idstr=idstr, bitmap=bytes(view[head + 8 : head + 8 + size]))
        self._buf.consume(head + 8 + size + 8)
        return event
