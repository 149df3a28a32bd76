"""Receive buffer: a queue of immutable chunks, joined only where an item spans two.

``receive_data`` keeps the caller's ``bytes`` as they are (no copy), so page
records can be handed out as memoryviews into them.  Small chunks are merged
on arrival so byte-at-a-time feeding does not build long chunk lists.  A join
copies only the bytes of the item that needs to be contiguous, so parsing stays
O(n) overall.
"""

from __future__ import annotations

from collections import deque

__all__ = ["ReceiveBuffer"]

_SMALL = 64 * 1024


class ReceiveBuffer:
    def __init__(self) -> None:
        self._chunks: deque[memoryview] = deque()
        self._len = 0
        #: bytes consumed since the start of the stream (for error offsets)
        self.consumed = 0
        self.eof = False

    def __len__(self) -> int:
        return self._len

    def append(self, data: bytes | bytearray | memoryview) -> None:
        if not len(data):
            return
        # bytes are immutable: keep them; anything else may be reused by the caller.
        mv = memoryview(data if isinstance(data, bytes) else bytes(data)).cast("B")
        self._len += len(mv)
        if self._chunks and len(self._chunks[-1]) + len(mv) <= _SMALL:
            mv = memoryview(b"".join((self._chunks.pop(), mv)))
        self._chunks.append(mv)

    def front(self) -> memoryview:
        """The first chunk (possibly only part of what is buffered)."""
        return self._chunks[0] if self._chunks else memoryview(b"")

    def peek(self, n: int) -> memoryview | None:
        """``n`` contiguous bytes from the front, or None when fewer are buffered."""
        if self._len < n:
            return None
        first = self._chunks[0] if self._chunks else memoryview(b"")
        if len(first) >= n:
            return first[:n]
        parts: list[memoryview] = []
        need = n
        while need:
            c = self._chunks.popleft()
            if len(c) <= need:
                parts.append(c)
                need -= len(c)
            else:
                parts.append(c[:need])
                self._chunks.appendleft(c[need:])
                need = 0
        merged = memoryview(b"".join(parts))
        self._chunks.appendleft(merged)
        return merged

    def consume(self, n: int) -> None:
        if n > self._len:
            raise ValueError(f"consume({n}) with only {self._len} bytes buffered")
        self._len -= n
        self.consumed += n
        while n:
            c = self._chunks[0]
            if len(c) <= n:
                self._chunks.popleft()
                n -= len(c)
            else:
                self._chunks[0] = c[n:]
                n = 0
