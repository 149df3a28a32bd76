"""A reader that touches a headless destination's memory, as a guest would.

``postcopy dest --headless/--save --touch IDSTR[:STRIDE]``: from RUN on, one
thread reads one byte every STRIDE bytes of block IDSTR, from the block's top
down (against the background stream, which goes up), in C with the GIL
released (uffd.memtouch). Each missing page is a userfaultfd fault, so a page
request to the source: what a running guest does, without a guest. Its figures
(pages read, the longest single wait) show whether reads waited on the source,
e.g. across a pause and recovery.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from uffd import RamBlock
from uffd.memtouch import touch_range

__all__ = ["TouchPattern", "TouchReader"]

#: Reads per C call: small, so that the longest wait says how long one read waited.
_READS_PER_CALL = 4


@dataclass(frozen=True, slots=True)
class TouchPattern:
    """Block ``idstr``, one read every ``stride`` bytes, top down."""

    idstr: str
    stride: int = 4096

    @classmethod
    def parse(cls, text: str) -> TouchPattern:
        """``IDSTR`` or ``IDSTR:STRIDE`` (bytes; a multiple of 4096). An idstr may hold ':'
        (QEMU's "/rom@etc/acpi/tables" does not, but be safe): only a numeric tail is a stride."""
        idstr, sep, tail = text.rpartition(":")
        if not sep or not tail.isdigit():
            idstr, tail = text, "4096"
        stride = int(tail)
        if not idstr:
            raise ValueError(f"{text!r}: no RAM block named")
        if stride <= 0 or stride % 4096:
            raise ValueError(f"{text!r}: the stride {stride} must be a positive multiple of 4096")
        return cls(idstr=idstr, stride=stride)


@dataclass(frozen=True, slots=True)
class TouchStats:
    idstr: str
    stride: int
    pages: int              # reads done
    planned: int            # reads the pattern has
    seconds: float          # from the first read to the last (or now)
    longest_wait_s: float   # the longest single C call (a few reads): a read that waited on the source

    @property
    def done(self) -> bool:
        return self.pages == self.planned

    def as_dict(self) -> dict[str, object]:
        return {"idstr": self.idstr, "stride": self.stride, "pages": self.pages, "planned": self.planned,
                "done": self.done, "seconds": round(self.seconds, 4),
                "longest_wait_s": round(self.longest_wait_s, 4)}


class TouchReader:
    """One thread reading ``block`` in ``pattern``; :meth:`stop` ends it between calls."""

    def __init__(self, block: RamBlock, pattern: TouchPattern) -> None:
        self.block = block
        self.pattern = pattern
        self.planned = -(-block.used_length // pattern.stride)
        self._pages = 0
        self._started = 0.0
        self._ended: float | None = None
        self._longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"touch-{pattern.idstr}", daemon=True)

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread.start()

    def _run(self) -> None:
        stride = self.pattern.stride
        step = stride * _READS_PER_CALL
        top = self.planned * stride             # the reads are at k * stride, k < planned
        end = top
        while end > 0 and not self._stop.is_set():
            begin = max(0, end - step)
            t0 = time.monotonic()
            touch_range(self.block, begin, min(end, self.block.used_length) - begin, stride)
            self._longest = max(self._longest, time.monotonic() - t0)
            self._pages += (end - begin) // stride
            end = begin
        self._ended = time.monotonic()

    def wait(self, timeout: float = 10.0) -> bool:
        """Wait for the reads to end (every page is there after the migration): False if not in time."""
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop after the current call; False when it still waits (a read the source never served)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def stats(self) -> TouchStats:
        end = self._ended if self._ended is not None else time.monotonic()
        return TouchStats(idstr=self.pattern.idstr, stride=self.pattern.stride, pages=self._pages,
                          planned=self.planned, seconds=max(0.0, end - self._started) if self._started else 0.0,
                          longest_wait_s=self._longest)
