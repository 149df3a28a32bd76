"""The per-VMM record that outlives the serving process: a memfd shared by the
supervisor (which creates it and keeps it) and the server (which writes it).

Layout (``uffd/csrc/handler.h``): ``pc_hs_state`` counters in the first 4 KiB,
then the placed bitmap, then the removed bitmap, one bit per page.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Any

from uffd._lowlevel import ffi, lib

__all__ = ["LatencySummary", "SharedState", "StateSnapshot"]

_COUNTERS = (
    "npages", "total_bytes", "start_ns", "resident_ns", "restarts", "generation",
    "faults", "faults_copy", "faults_zero", "faults_present",
    "pages_fault", "pages_fill", "pages_zero", "bytes_fault", "bytes_fill", "bytes_zero",
    "eexist", "eagain", "removes", "removed_bytes", "unregistered_bytes", "wakes",
    "fill_chunk", "fill_cursor", "fill_steps", "pages_done", "enoent",
    "lat_count", "lat_sum_ns", "lat_max_ns",
)


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Fault read -> page placed, from the shared histogram (percentiles are bucket upper bounds, <= 12.5% high)."""

    count: int
    mean_us: float
    p50_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float

    def as_json(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean_us, "p50": self.p50_us, "p90": self.p90_us,
                "p99": self.p99_us, "p999": self.p999_us, "max": self.max_us}


@dataclass(frozen=True, slots=True)
class StateSnapshot:
    """One read of the shared counters (a consistent-enough copy: each field is one 64-bit load)."""

    counters: dict[str, int]
    prom_buckets: tuple[int, ...]
    """Non-cumulative counts per Prometheus bucket, the last one above every bound."""
    log_buckets: tuple[int, ...]

    def __getitem__(self, name: str) -> int:
        return self.counters[name]

    def latency(self) -> LatencySummary:
        count = sum(self.log_buckets)
        if count == 0:
            return LatencySummary(0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

        def at(q: float) -> float:
            need, seen = max(1, round(q * count)), 0
            for i, n in enumerate(self.log_buckets):
                seen += n
                if seen >= need:
                    return round(int(lib.pc_hs_log_bucket_upper_ns(i)) / 1000, 1)
            return round(self["lat_max_ns"] / 1000, 1)

        return LatencySummary(count, round(self["lat_sum_ns"] / count / 1000, 1), at(0.5), at(0.9), at(0.99),
                              at(0.999), round(self["lat_max_ns"] / 1000, 1))


class SharedState:
    """A mapping of one VMM's shared record. ``create`` makes the memfd; ``attach`` maps a received one."""

    def __init__(self, fd: int, npages: int) -> None:
        self.fd = fd
        self.npages = npages
        self.size = int(lib.pc_hs_shared_size(npages))
        self._map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._buf: Any = ffi.from_buffer(self._map)
        self.state: Any = ffi.cast("pc_hs_state *", self._buf)

    @classmethod
    def create(cls, name: str, npages: int) -> SharedState:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, int(lib.pc_hs_shared_size(npages)))
            return cls(fd, npages)
        except BaseException:
            os.close(fd)
            raise

    @property
    def pointer(self) -> Any:
        """``void *`` to the record, for the C core."""
        return self._buf

    def snapshot(self) -> StateSnapshot:
        st = self.state
        return StateSnapshot(
            {name: int(getattr(st, name)) for name in _COUNTERS},
            tuple(int(st.lat_prom[i]) for i in range(int(lib.PC_HS_PROM_BUCKETS) + 1)),
            tuple(int(st.lat_log[i]) for i in range(int(lib.PC_HS_LOG_BUCKETS))),
        )

    def count_done(self) -> int:
        """Pages placed or removed, counted from the bitmaps."""
        return int(lib.pc_hs_count_done(self._buf, self.npages))

    def close(self, *, close_fd: bool = True) -> None:
        if self._buf is None:
            return
        ffi.release(self._buf)
        self._buf = None
        self.state = None
        self._map.close()
        if close_fd:
            os.close(self.fd)
