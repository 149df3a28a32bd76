"""Page sources: where the bytes a fault needs come from.

Today there is one kind, :class:`MemoryFileSource`: the whole memory file is
mapped readable and the C loop copies any page the moment it is needed (a
*synchronous* source). A live postcopy stream is the other kind (an
*asynchronous* source): a fault becomes a page request and the page is placed
later, when it arrives, through ``pc_hs_place`` (see docs/uffd-handler.md,
"Live mode"). The handler's C core is written against both: ``pc_hs_open``
takes the synchronous mapping, ``pc_hs_place`` is the entry for pages that
arrive on their own.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any, Protocol

from uffd._lowlevel import ffi

__all__ = ["MemoryFileSource", "PageSource"]


class PageSource(Protocol):
    """What a server needs from the source of guest memory contents."""

    @property
    def size(self) -> int:
        """Bytes of guest memory the source holds (regions must lie inside)."""
        ...

    def mapping(self) -> tuple[Any, int]:
        """(``const uint8_t *``, length): readable memory holding every byte, for synchronous copies."""
        ...

    def close(self) -> None: ...


class MemoryFileSource:
    """A snapshot memory file (Firecracker's ``mem_file_path``), mapped read-only."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._size = os.fstat(fd).st_size
            if self._size == 0:
                raise ValueError(f"memory file {self.path} is empty")
            self._map = mmap.mmap(fd, self._size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self._buf: Any = ffi.from_buffer("uint8_t[]", self._map)

    @property
    def size(self) -> int:
        return self._size

    def mapping(self) -> tuple[Any, int]:
        return self._buf, self._size

    def close(self) -> None:
        if self._buf is not None:
            ffi.release(self._buf)
            self._buf = None
            self._map.close()
