"""``Bitmap``: one bit per target page, in C memory shared with C threads."""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

from ._lowlevel import ffi, lib

__all__ = ["Bitmap"]


class Bitmap:
    """A fixed-size bitmap whose updates are atomic, so C threads may share it.

    ``cdata`` is the ``pc_bitmap *`` to pass to C; it lives as long as this
    object. Bits past ``nbits`` are always zero.
    """

    __slots__ = ("_b", "nbits")

    def __init__(self, nbits: int) -> None:
        nbits = operator.index(nbits)
        if nbits < 0 or nbits >= 1 << 63:
            raise ValueError(f"Bitmap: nbits={nbits} must be in 0..2**63-1")
        raw = lib.pc_bitmap_new(nbits)
        if raw == ffi.NULL:
            raise MemoryError(f"Bitmap: cannot allocate {nbits} bits")
        self._b = ffi.gc(raw, lib.pc_bitmap_free)
        self.nbits = nbits

    @property
    def cdata(self) -> Any:
        return self._b

    def __len__(self) -> int:
        return self.nbits

    def _index(self, op: str, i: int) -> int:
        i = operator.index(i)
        if not 0 <= i < self.nbits:
            raise IndexError(
                f"Bitmap.{op}: bit {i} is outside 0..{self.nbits - 1} (nbits={self.nbits})"
            )
        return i

    def _range(self, op: str, start: int, n: int) -> tuple[int, int]:
        start, n = operator.index(start), operator.index(n)
        if start < 0 or n < 0 or start + n > self.nbits:
            raise IndexError(
                f"Bitmap.{op}: range start={start} n={n} is outside 0..{self.nbits} (nbits={self.nbits})"
            )
        return start, n

    def _start(self, op: str, start: int) -> int:
        start = operator.index(start)
        if not 0 <= start <= self.nbits:
            raise IndexError(f"Bitmap.{op}: start={start} is outside 0..{self.nbits}")
        return start

    def set(self, i: int) -> None:
        lib.pc_bitmap_set_atomic(self._b, self._index("set", i))

    def clear(self, i: int) -> None:
        lib.pc_bitmap_clear_atomic(self._b, self._index("clear", i))

    def test(self, i: int) -> bool:
        return bool(lib.pc_bitmap_test(self._b, self._index("test", i)))

    def test_and_set(self, i: int) -> bool:
        """Set bit i; return its old value (atomic)."""
        return bool(lib.pc_bitmap_test_and_set_atomic(self._b, self._index("test_and_set", i)))

    def set_range(self, start: int, n: int) -> None:
        lib.pc_bitmap_set_range_atomic(self._b, *self._range("set_range", start, n))

    def clear_range(self, start: int, n: int) -> None:
        lib.pc_bitmap_clear_range_atomic(self._b, *self._range("clear_range", start, n))

    def find_next_set(self, start: int = 0) -> int:
        """First set bit at or after start; nbits if none."""
        return int(lib.pc_bitmap_find_next_set(self._b, self._start("find_next_set", start)))

    def find_next_zero(self, start: int = 0) -> int:
        """First clear bit at or after start; nbits if none."""
        return int(lib.pc_bitmap_find_next_zero(self._b, self._start("find_next_zero", start)))

    def count(self) -> int:
        return int(lib.pc_bitmap_count(self._b))

    def invert(self) -> None:
        """Complement every bit below nbits in place (not atomic against C writers)."""
        lib.pc_bitmap_invert(self._b)

    def iter_set(self) -> Iterator[int]:
        i = self.find_next_set(0)
        while i < self.nbits:
            yield i
            i = self.find_next_set(i + 1)

    @staticmethod
    def le_size(nbits: int) -> int:
        """Bytes of the QEMU received-bitmap encoding: ceil(nbits/8) rounded up to 8."""
        return int(lib.pc_bitmap_le_size(nbits))

    def to_le_bytes(self) -> bytes:
        """QEMU's received-bitmap layout: bit i is bit i%8 of byte i//8, zero padded to 8 bytes."""
        size = self.le_size(self.nbits)
        out = ffi.new("uint8_t[]", size or 1)
        lib.pc_bitmap_to_le(self._b, out)
        return bytes(ffi.buffer(out, size))

    @classmethod
    def from_le_bytes(cls, nbits: int, data: bytes | bytearray | memoryview) -> Bitmap:
        """Inverse of to_le_bytes; ValueError on a wrong length or set padding bits."""
        bm = cls(nbits)
        size = cls.le_size(bm.nbits)
        view = memoryview(data).cast("B")
        if len(view) != size:
            raise ValueError(
                f"Bitmap.from_le_bytes: {len(view)} bytes for nbits={nbits}, expected {size}"
            )
        rc = lib.pc_bitmap_from_le(bm._b, ffi.from_buffer("uint8_t[]", view), size)
        if rc < 0:
            raise ValueError(
                f"Bitmap.from_le_bytes: padding bits past nbits={nbits} are set in the last 8 bytes"
            )
        return bm

    def __repr__(self) -> str:
        return f"<Bitmap nbits={self.nbits} set={self.count()}>"
