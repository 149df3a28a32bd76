"""Shared machinery of the three stream decoders (h11-style feed API)."""

from __future__ import annotations

import struct
from collections import deque
from typing import ClassVar, Final

from ._buffer import ReceiveBuffer
from ._errors import LocalProtocolError, RemoteProtocolError
from ._events import ConnectionClosed, WireEvent

__all__ = ["NEED_DATA", "NeedData"]


class NeedData:
    """Sentinel type: ``next_event()`` needs more bytes (or EOF) first."""

    _instance: ClassVar[NeedData | None] = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()

BE32 = struct.Struct(">I")
BE64 = struct.Struct(">Q")


class Short(Exception):
    """Internal: the item at the front is not complete yet (nothing consumed).

    ``need``: the decoder tries the item again only once this many bytes are
    buffered (or at EOF), so a short read costs nothing until it can help.
    """

    def __init__(self, need: int) -> None:
        super().__init__(need)
        self.need = need


def describe_bytes(view: bytes | memoryview, limit: int = 16) -> str:
    b = bytes(view[:limit])
    return b.hex(" ") + (" ..." if len(view) > limit else "")


class BaseDecoder:
    """``receive_data(data)`` buffers (b"" = EOF); ``next_event()`` returns one event or NEED_DATA.

    If ``next_event`` raises anything but RemoteProtocolError, that is a bug.
    After a RemoteProtocolError the decoder refuses further input.
    """

    def __init__(self) -> None:
        self._buf = ReceiveBuffer()
        self._pending: deque[WireEvent] = deque()
        self._error: RemoteProtocolError | None = None
        self._closed: ConnectionClosed | None = None
        #: what the item at the front is, for "truncated" messages
        self._expecting = "item"
        #: no step is tried before this many bytes are buffered (set by Short)
        self._want = 0
        #: a copy of the first len(_acc) buffered bytes, for items scanned as they arrive
        self._acc = bytearray()
        self._acc_at = 0  # stream offset of _acc[0]

    # -- public API ------------------------------------------------------

    @property
    def offset(self) -> int:
        """Stream offset of the next byte to decode."""
        return self._buf.consumed

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded."""
        return len(self._buf)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer ``data``; ``b""`` means the peer closed (EOF)."""
        if self._error is not None:
            raise LocalProtocolError(f"decoder already failed ({self._error}); it takes no more input",
                                     kind="after_error")
        if self._buf.eof:
            raise LocalProtocolError(f"receive_data({len(data)} bytes) after EOF", kind="after_eof")
        if len(data) == 0:
            self._buf.eof = True
        else:
            self._buf.append(data)

    def next_event(self) -> WireEvent | NeedData:
        if self._error is not None:
            raise self._error
        try:
            if self._pending:
                return self._pending.popleft()
            if self._closed is not None:
                return self._closed
            if self._buf.size < self._want and not self._buf.eof:
                return NEED_DATA
            try:
                event = self._step()
                self._want = 0
            except Short as short:
                self._want = short.need
                event = NEED_DATA
            if event is NEED_DATA and self._buf.eof:
                if len(self._buf):
                    raise LocalProtocolError(
                        f"stream ends {len(self._buf)} bytes into an incomplete {self._expecting}: "
                        f"{describe_bytes(self._buf.peek(len(self._buf)) or b'')}",
                        kind="truncated", offset=self._buf.consumed,
                    )
                self._closed = ConnectionClosed(complete=self._complete())
                return self._closed
            return event
        except LocalProtocolError as exc:
            self._error = exc._as(RemoteProtocolError)
            raise self._error from None

    def events(self) -> list[WireEvent]:
        """Every event available now (stops at NEED_DATA or ConnectionClosed)."""
        out: list[WireEvent] = []
        while True:
            ev = self.next_event()
            if isinstance(ev, NeedData):
                return out
            out.append(ev)
            if isinstance(ev, ConnectionClosed):
                return out

    # -- for subclasses ----------------------------------------------------

    def _step(self) -> WireEvent | NeedData:
        raise NotImplementedError

    def _complete(self) -> bool:
        return True

    def _need(self, n: int) -> memoryview:
        view = self._buf.peek(n)
        if view is None:
            raise Short(n)
        return view

    def _grow(self, n: int, cap: int) -> bytearray:
        """A copy of at least the first ``n`` buffered bytes (Short if fewer have arrived).

        For items whose end is found by scanning (device sections, the RAM
        setup): the copy is kept while the item at the front stays the same, and
        only bytes not copied yet are added, at least doubling it (up to ``cap``
        or what is buffered), so each byte is copied O(1) times however the item
        arrives.  Never keep a memoryview of the result: it grows in place.
        """
        if self._acc_at != self._buf.consumed:
            self._acc = bytearray()
            self._acc_at = self._buf.consumed
        acc = self._acc
        have = len(acc)
        if have >= n:
            return acc
        if len(self._buf) < n:
            raise Short(n)
        self._buf.copy_into(acc, have, max(n, min(len(self._buf), cap, max(2 * have, 4096))))
        return acc

    def _drop_acc(self) -> None:
        """Release the item copy (after the item was consumed)."""
        self._acc = bytearray()

    def _fail(self, kind: str, message: str, rel: int = 0) -> LocalProtocolError:
        return LocalProtocolError(message, kind=kind, offset=self._buf.consumed + rel)
