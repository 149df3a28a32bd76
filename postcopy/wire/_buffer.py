"""Receive buffer: a queue of immutable chunks, joined only where an item spans two.

``receive_data`` keeps the caller's ``bytes`` as they are (no copy) when they
are large, so page records can be handed out as memoryviews into them.  Small
pieces are appended to a private ``bytearray`` tail (amortised O(1) per byte)
that becomes an immutable chunk when it reaches ``_SMALL`` bytes or when a
reader needs its bytes.  ``peek`` joins only the bytes of an item that must be
contiguous, and only once they have all arrived, so a fixed-size item costs
O(its size) however it arrives.

Items whose length is not known up front (device sections, the RAM setup) are
not joined again and again while they arrive: their decoder copies each new
byte once into its own accumulator with :meth:`ReceiveBuffer.copy_into` and
resumes its scan where it stopped (see ``BaseDecoder._grow``).

``copied`` counts every byte this buffer copies (tail appends, seals, joins,
``copy_into``): the tests use it to show that the work is linear in the input.
"""

from __future__ import annotations

from collections import deque

__all__ = ["ReceiveBuffer"]

_SMALL = 64 * 1024


class ReceiveBuffer:
    def __init__(self) -> None:
        #: immutable chunks (bytes-backed), then ``_tail`` (bytes that arrived after them)
        self._chunks: deque[memoryview] = deque()
        self._tail = bytearray()
        self._sealed = 0  # bytes in _chunks
        #: bytes buffered (what ``len()`` says; an attribute, read on every decoder step)
        self.size = 0
        #: bytes consumed since the start of the stream (for error offsets)
        self.consumed = 0
        #: bytes copied by the buffer since it was created (a work counter for tests)
        self.copied = 0
        self.eof = False

    def __len__(self) -> int:
        return self.size

    def append(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if not n:
            return
        self.size += n
        if not self._tail:
            if isinstance(data, bytes) and (n >= _SMALL or not self._chunks):
                # bytes are immutable: keep them (anything else may be reused by the caller)
                self._chunks.append(memoryview(data).cast("B"))
                self._sealed += n
                return
            if n >= _SMALL:
                self._chunks.append(memoryview(bytes(data)).cast("B"))
                self._sealed += n
                self.copied += n
                return
            if self._chunks and len(self._chunks[-1]) <= n:
                # typically the rest of a partly decoded read: one copy, at most 2n bytes
                merged = memoryview(b"".join((self._chunks.pop(), data)))
                self._chunks.append(merged)
                self._sealed += n
                self.copied += len(merged)
                return
        self._tail += data
        self.copied += n
        if len(self._tail) >= _SMALL:
            self._seal()

    def _seal(self) -> None:
        """Move the tail into an immutable chunk."""
        if self._tail:
            mv = memoryview(bytes(self._tail))
            self.copied += len(mv)
            self._tail = bytearray()
            self._chunks.append(mv)
            self._sealed += len(mv)

    def front(self) -> memoryview:
        """The first chunk (possibly only part of what is buffered)."""
        if not self._chunks:
            self._seal()
        return self._chunks[0] if self._chunks else memoryview(b"")

    def peek(self, n: int) -> memoryview | None:
        """``n`` contiguous bytes from the front, or None when fewer are buffered."""
        if self.size < n:
            return None
        if self._chunks and len(self._chunks[0]) >= n:
            return self._chunks[0][:n]
        parts: list[bytes | bytearray | memoryview] = []
        need = n
        while need and self._chunks:
            c = self._chunks.popleft()
            if len(c) <= need:
                parts.append(c)
                need -= len(c)
            else:
                parts.append(c[:need])
                self._chunks.appendleft(c[need:])
                need = 0
        if need:  # the rest comes from the tail
            parts.append(self._tail[:need])
            del self._tail[:need]
        merged = memoryview(b"".join(parts))
        self._sealed += need
        self.copied += n
        self._chunks.appendleft(merged)
        return merged

    def copy_into(self, out: bytearray, start: int, end: int) -> None:
        """Append the buffered bytes ``[start, end)`` to ``out`` (no join, no seal).

        The walk starts from whichever end of the buffer is nearer ``start``:
        an item that arrives in small pieces asks for the bytes that arrived
        last (at the back); a large read decoded item by item asks for bytes
        near the front.
        """
        end = min(end, self.size)
        if start >= end:
            return
        self.copied += end - start
        sealed = self._sealed
        if start >= sealed:  # all in the tail
            out += self._tail[start - sealed : end - sealed]
            return
        if start < self.size - start:  # from the front
            lo = 0
            for c in self._chunks:
                hi = lo + len(c)
                if hi > start:
                    out += c[max(start - lo, 0) : min(end, hi) - lo]
                    if hi >= end:
                        return
                lo = hi
            out += self._tail[: end - sealed]
            return
        # from the back
        pieces: list[bytes | bytearray | memoryview] = []
        if end > sealed:
            pieces.append(self._tail[: end - sealed])
        hi = sealed
        for c in reversed(self._chunks):
            lo = hi - len(c)
            if lo < end:
                pieces.append(c[max(start - lo, 0) : min(end, hi) - lo])
            if lo <= start:
                break
            hi = lo
        for p in reversed(pieces):
            out += p

    def consume(self, n: int) -> None:
        if n > self.size:
            raise ValueError(f"consume({n}) with only {self.size} bytes buffered")
        self.size -= n
        self.consumed += n
        while n and self._chunks:
            c = self._chunks[0]
            if len(c) <= n:
                self._chunks.popleft()
                self._sealed -= len(c)
                n -= len(c)
            else:
                self._chunks[0] = c[n:]
                self._sealed -= n
                n = 0
        if n:
            del self._tail[:n]  # O(1) amortised: CPython moves the start of a bytearray

