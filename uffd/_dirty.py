"""Dirty-page tracking by the kernel (``uffd/csrc/dirty.c``), for precopy.

Two methods, both with no help from whoever writes the memory:

* ``wp-async``: userfaultfd write-protect in async mode (Linux 6.7+) and the
  PAGEMAP_SCAN ioctl, which lists written pages and protects them again in one
  call (nothing written during a scan is lost);
* ``soft-dirty``: ``/proc/PID/clear_refs`` and bit 55 of ``/proc/PID/pagemap``.
  Reading and clearing are two steps, so the writers must be frozen around
  :meth:`DirtyTracker.collect` (``needs_freeze``).

Both handle 4 KiB pages and hugetlbfs, in this process or another one
(``pid``); write-protect tracking of another process needs a userfaultfd that
process made (``uffd``, received over SCM_RIGHTS).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Literal

from ._bitmap import Bitmap
from ._native import ffi, lib

__all__ = ["METHODS", "DirtyTracker", "TrackingMethod", "available_method", "method_available"]

TrackingMethod = Literal["wp-async", "soft-dirty"]
METHODS: Final[dict[str, int]] = {"wp-async": lib.PC_DIRTY_WP_ASYNC, "soft-dirty": lib.PC_DIRTY_SOFT}


def method_available(method: TrackingMethod) -> tuple[bool, str]:
    """(works here, why not)."""
    err = ffi.new("char[]", 256)
    ok = bool(lib.pc_dirty_probe(METHODS[method], err, 256))
    return ok, "" if ok else ffi.string(err).decode(errors="replace")


def available_method(prefer: str = "auto") -> TrackingMethod:
    """The method to use: ``prefer`` if it works, else wp-async, else soft-dirty."""
    order: list[TrackingMethod] = ["wp-async", "soft-dirty"]
    if prefer != "auto":
        if prefer not in METHODS:
            raise ValueError(f"dirty tracking {prefer!r}: choose auto, wp-async or soft-dirty")
        ok, why = method_available(prefer)  # type: ignore[arg-type]
        if not ok:
            raise OSError(f"dirty tracking {prefer}: {why}")
        return prefer  # type: ignore[return-value]
    reasons = []
    for m in order:
        ok, why = method_available(m)
        if ok:
            return m
        reasons.append(f"{m}: {why}")
    raise OSError("no dirty tracking works here: " + "; ".join(reasons))


class DirtyTracker:
    """Tracks writes to ``ranges`` (``(addr, length, host_page_size, bitmap)``):
    :meth:`collect` ORs the pages written since :meth:`start` or the last
    collect into each bitmap (one bit per 4 KiB page, whole host pages)."""

    def __init__(self, method: TrackingMethod, ranges: Sequence[tuple[int, int, int, Bitmap]], *,
                 pid: int = 0, uffd: int = -1) -> None:
        if method not in METHODS:
            raise ValueError(f"dirty tracking {method!r}: choose wp-async or soft-dirty")
        err = ffi.new("char[]", 256)
        raw = lib.pc_dirty_new(METHODS[method], pid, uffd, err, 256)
        if raw == ffi.NULL:
            raise OSError(f"dirty tracking ({method}): {ffi.string(err).decode(errors='replace')}")
        self._t: Any = ffi.gc(raw, lib.pc_dirty_free)
        self.method: TrackingMethod = method
        self.pid = pid
        self._bitmaps = [r[3] for r in ranges]      # the C side points into them
        for addr, length, page_size, bitmap in ranges:
            self._check(lib.pc_dirty_add_range(self._t, addr, length, page_size, bitmap.cdata), "add range")

    @property
    def needs_freeze(self) -> bool:
        """True when writers must be stopped around :meth:`collect` (soft-dirty)."""
        return self.method == "soft-dirty"

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            raise OSError(-rc, f"dirty tracking ({self.method}) {what}: {ffi.string(self._t.err).decode(errors='replace')}")
        return rc

    def start(self) -> None:
        """From now on, writes count (protect every page / clear the bits)."""
        self._check(lib.pc_dirty_start(self._t), "start")

    def collect(self) -> int:
        """OR the pages written since the last start/collect into the bitmaps and
        start over; returns how many 4 KiB pages were written."""
        return self._check(int(lib.pc_dirty_collect(self._t)), "collect")

    def stats(self) -> dict[str, int]:
        t = self._t
        return {"scans": int(t.scans), "scan_ns": int(t.scan_ns), "pages_found": int(t.pages_found)}

    def close(self) -> None:
        """Stop tracking (unprotect, unregister) and free the C object."""
        if self._t is not None:
            t, self._t = self._t, None
            lib.pc_dirty_stop(t)
            ffi.release(t)
