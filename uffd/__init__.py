"""userfaultfd and guest memory: the only package that touches the kernel.

Public API: ``Userfaultfd`` (open, negotiate, register, COPY/ZEROPAGE/WAKE/
WRITEPROTECT/CONTINUE/POISON, events), its flag types and errors; guest memory
(``RamBlock``, ``GuestMemory``); ``Bitmap``; ``FaultReader`` (batch fault reads
filtered in C). ``uffd.memtouch`` touches memory from C for tests and benches.
"""

from __future__ import annotations

from ._bitmap import Bitmap
from ._errors import (
    FeatureNotSupported,
    MappingChanged,
    PageAlreadyPresent,
    UffdClosedError,
    UffdError,
    UffdPermissionError,
    UnknownBlockError,
)
from ._events import Fork, PageFault, Remap, Remove, UffdEvent, Unmap
from ._faults import TARGET_PAGE_SIZE, Fault, FaultBatch, FaultReader
from ._fd import Userfaultfd
from ._flags import (
    ContinueMode,
    CopyMode,
    EventType,
    FaultFlag,
    FaultStatus,
    Feature,
    Ioctl,
    RegisterMode,
    ZeropageMode,
)
from ._memory import PAGE_1G, PAGE_2M, PAGE_4K, Backing, GuestMemory, RamBlock, free_hugepages

__all__ = [
    "PAGE_1G",
    "PAGE_2M",
    "PAGE_4K",
    "TARGET_PAGE_SIZE",
    "Backing",
    "Bitmap",
    "ContinueMode",
    "CopyMode",
    "EventType",
    "Fault",
    "FaultBatch",
    "FaultFlag",
    "FaultReader",
    "FaultStatus",
    "Feature",
    "FeatureNotSupported",
    "Fork",
    "GuestMemory",
    "Ioctl",
    "MappingChanged",
    "PageAlreadyPresent",
    "PageFault",
    "RamBlock",
    "RegisterMode",
    "Remap",
    "Remove",
    "UffdClosedError",
    "UffdError",
    "UffdEvent",
    "UffdPermissionError",
    "UnknownBlockError",
    "Unmap",
    "Userfaultfd",
    "ZeropageMode",
    "free_hugepages",
]
