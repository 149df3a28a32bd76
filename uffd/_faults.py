"""``FaultReader``: batch fault reads filtered in C against per-block bitmaps."""

from __future__ import annotations

import errno
import itertools
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from ._bitmap import Bitmap
from ._errors import UffdError
from ._events import UffdEvent, event_from_c
from ._fd import Userfaultfd
from ._flags import FaultFlag, FaultStatus, Feature
from ._lowlevel import ffi, lib
from ._memory import RamBlock

__all__ = ["TARGET_PAGE_SIZE", "Fault", "FaultBatch", "FaultReader"]

#: the data path's page granularity, from the C core (checked against the wire codec by a test)
TARGET_PAGE_SIZE: int = lib.PC_TARGET_PAGE_SIZE
MAX_BATCH = 256  # the C reader's per-read() limit


class Fault(NamedTuple):
    """One fault of a batch, as a Python object (convenience; the hot path reads the cdata)."""

    address: int
    block: RamBlock | None
    offset: int
    flags: FaultFlag
    tid: int | None
    status: FaultStatus
    t_ns: int


class FaultBatch:
    """The result of one ``FaultReader.read_batch()``.

    ``faults`` is the reader's reused ``pc_fault[]`` (valid until the next
    read_batch), ``count`` how many entries are filled, ``dropped`` how many
    faults were discarded because their page was already received, and
    ``other_events`` the non-fault events read in the same batch (the fd of a
    Fork event belongs to the caller: adopt or close it).
    """

    __slots__ = ("_reader", "count", "dropped", "faults", "other_events")

    def __init__(
        self, reader: FaultReader, faults: Any, count: int, dropped: int, other_events: list[UffdEvent]
    ) -> None:
        self._reader = reader
        self.faults = faults
        self.count = count
        self.dropped = dropped
        self.other_events = other_events

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Fault]:
        blocks = self._reader.blocks
        thread_id = self._reader.thread_id
        for i in range(self.count):
            f = self.faults[i]
            status = FaultStatus(f.status)
            yield Fault(
                address=f.address,
                block=None if status == FaultStatus.OUTSIDE else blocks[f.block],
                offset=f.offset,
                flags=FaultFlag(f.flags),
                tid=f.tid if thread_id else None,
                status=status,
                t_ns=f.t_ns,
            )


class FaultReader:
    """Read faults of ``uffd`` in batches, mapped to blocks and deduplicated in C.

    ``blocks_with_bitmaps`` holds ``(block, received, requested)``; either
    bitmap may be None, else it must have one bit per 4 KiB of the block. A
    fault on a host page whose first target page is received is dropped; the
    first fault of a page sets its requested bit (status NEW), later ones are
    ALREADY_REQUESTED; an address in no block is OUTSIDE.

    ``blocks`` is sorted by address: ``pc_fault.block`` indexes it. ``desc``
    and ``nblocks`` let other C code reuse the same ``pc_block_desc[]``.
    """

    def __init__(
        self,
        uffd: Userfaultfd,
        blocks_with_bitmaps: Iterable[tuple[RamBlock, Bitmap | None, Bitmap | None]],
        max_batch: int = MAX_BATCH,
    ) -> None:
        if not 1 <= max_batch <= MAX_BATCH:
            raise ValueError(f"FaultReader: max_batch={max_batch} must be in 1..{MAX_BATCH}")
        entries = sorted(blocks_with_bitmaps, key=lambda e: e[0].addr)
        for (prev, _, _), (cur, _, _) in itertools.pairwise(entries):
            if prev.end > cur.addr:
                raise ValueError(
                    f"FaultReader: RAM blocks {prev.idstr!r} and {cur.idstr!r} overlap"
                )
        self.uffd = uffd
        self.blocks: tuple[RamBlock, ...] = tuple(e[0] for e in entries)
        self._bitmaps = [(r, q) for _, r, q in entries]  # keep the C memory alive
        self.nblocks = len(entries)
        self.desc = ffi.new("pc_block_desc[]", max(self.nblocks, 1))
        for i, (block, received, requested) in enumerate(entries):
            if block.closed:
                raise ValueError(f"FaultReader: RAM block {block.idstr!r} is closed")
            need = block.used_length // TARGET_PAGE_SIZE
            for name, bm in (("received", received), ("requested", requested)):
                if bm is not None and bm.nbits < need:
                    raise ValueError(
                        f"FaultReader: {name} bitmap of RAM block {block.idstr!r} has {bm.nbits} bits, "
                        f"needs {need} (one per 4 KiB)"
                    )
            d = self.desc[i]
            d.base = block.addr
            d.length = block.used_length
            d.host_page_size = block.page_size
            d.received = received.cdata if received is not None else ffi.NULL
            d.requested = requested.cdata if requested is not None else ffi.NULL
        self.max_batch = max_batch
        self.thread_id = Feature.THREAD_ID in uffd.enabled_features
        self._faults = ffi.new("pc_fault[]", max_batch)
        self._other = ffi.new("pc_uffd_event[]", max_batch)
        self._dropped = ffi.new("uint32_t *")
        self._nother = ffi.new("uint32_t *")

    def read_batch(self) -> FaultBatch:
        """One read() of up to max_batch events; an empty batch when nothing is pending."""
        fd = self.uffd.fileno()
        n = lib.pc_read_faults_ex(
            fd, self.desc, self.nblocks, self._faults, self.max_batch, self._dropped,
            self._other, self.max_batch, self._nother,
        )  # fmt: skip
        if n == -errno.EAGAIN:
            return FaultBatch(self, self._faults, 0, 0, [])
        if n < 0:
            raise UffdError(-n, "read", f"userfaultfd fd={fd} max_events={self.max_batch}")
        nother = self._nother[0]
        others = (
            [event_from_c(self._other[i], self.thread_id) for i in range(nother)] if nother else []
        )
        return FaultBatch(self, self._faults, n, int(self._dropped[0]), others)
