"""Guest memory: named RAM blocks (anonymous, memfd, hugetlbfs, or a private map of a file) and their set."""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import functools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from ._errors import UnknownBlockError
from ._lowlevel import ffi, lib

__all__ = ["GuestMemory", "RamBlock"]

Backing = Literal["anon", "memfd", "hugetlbfs", "file"]

PAGE_4K = 4096
PAGE_2M = 2 << 20
PAGE_1G = 1 << 30
_HUGE_FLAGS = {PAGE_2M: os.MFD_HUGE_2MB, PAGE_1G: os.MFD_HUGE_1GB}
# QEMU sends an idstr with a one-byte length.
MAX_IDSTR_BYTES = 255


@functools.cache
def _libc_mmap() -> Any:
    fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).mmap
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    fn.restype = ctypes.c_void_p
    return fn


def free_hugepages(page_size: int) -> int:
    """Free hugetlbfs pages of ``page_size`` bytes on this host (0 if none configured)."""
    path = Path(f"/sys/kernel/mm/hugepages/hugepages-{page_size // 1024}kB/free_hugepages")
    try:
        return int(path.read_text())
    except OSError:
        return 0


class RamBlock:
    """A named, page-aligned region of guest memory mapped in this process.

    ``page_size`` is the host page size: 4096 for "anon" and "memfd", 2 MiB or
    1 GiB for "hugetlbfs" (a MFD_HUGETLB memfd). "memfd" and "hugetlbfs"
    blocks have an ``fd`` another process can map (MAP_SHARED).
    """

    #: every page was allocated up front (prefill): a destination writes pages through a second mapping
    prefilled = False
    _alias = 0

    def __init__(
        self, idstr: str, used_length: int, page_size: int = PAGE_4K, backing: Backing = "anon"
    ) -> None:
        self.addr = 0
        self.fd: int | None = None
        if (
            not isinstance(idstr, str)
            or not idstr
            or len(idstr.encode()) > MAX_IDSTR_BYTES
            or "\0" in idstr
        ):
            raise ValueError(
                f"RAM block idstr must be 1..{MAX_IDSTR_BYTES} bytes without NUL, got {idstr!r}"
            )
        if backing not in ("anon", "memfd", "hugetlbfs"):
            raise ValueError(
                f"RAM block {idstr!r}: backing must be 'anon', 'memfd' or 'hugetlbfs', got {backing!r}"
            )
        allowed = (PAGE_2M, PAGE_1G) if backing == "hugetlbfs" else (PAGE_4K,)
        if page_size not in allowed:
            raise ValueError(
                f"RAM block {idstr!r}: page_size={page_size} is not valid for backing={backing!r} "
                f"(allowed: {', '.join(map(str, allowed))})"
            )
        if not isinstance(used_length, int) or used_length <= 0 or used_length % page_size:
            raise ValueError(
                f"RAM block {idstr!r}: used_length={used_length} must be a positive multiple of "
                f"the page size {page_size}"
            )
        self.idstr = idstr
        self.used_length = used_length
        self.page_size = page_size
        self.backing: Backing = backing
        if backing != "anon":
            flags = os.MFD_CLOEXEC
            if backing == "hugetlbfs":
                flags |= os.MFD_HUGETLB | _HUGE_FLAGS[page_size]
            self.fd = os.memfd_create(idstr, flags)
        try:
            if self.fd is not None:
                os.ftruncate(self.fd, used_length)
            out = ffi.new("uint64_t *")
            rc = lib.pc_mem_map(-1 if self.fd is None else self.fd, used_length, out)
            if rc < 0:
                hint = ""
                if backing == "hugetlbfs":
                    hint = (
                        f"; needs {used_length // page_size} free {page_size >> 20} MiB hugepages, "
                        f"{free_hugepages(page_size)} free"
                    )
                raise OSError(
                    -rc,
                    f"mmap of RAM block {idstr!r} ({used_length} bytes, {backing}): {os.strerror(-rc)}{hint}",
                )
            self.addr = int(out[0])
        except BaseException:
            self.close()
            raise

    @classmethod
    def map_file(cls, idstr: str, path: str | os.PathLike[str], page_size: int = PAGE_4K) -> RamBlock:
        """A block whose memory is a private map of the whole file at ``path`` (backing "file").

        Pages are read from the file when first touched (the page cache: a
        saved VM served lazily); writes, if any, stay private and never reach
        the file. ``page_size`` is the guest's page size for this block (what a
        migration stream declares, e.g. 2 MiB for a block QEMU backs with
        hugetlbfs); the mapping itself uses base pages. Not for userfaultfd.
        """
        if page_size < PAGE_4K or page_size & (page_size - 1):
            raise ValueError(f"RAM block {idstr!r}: page_size={page_size} is not a power of two >= {PAGE_4K}")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size <= 0 or size % page_size:
                raise ValueError(f"RAM block {idstr!r}: {path} has {size} bytes, not a positive multiple of "
                                 f"the page size {page_size}")
            prot, flags = 0x1 | 0x2, 0x02       # PROT_READ | PROT_WRITE, MAP_PRIVATE
            addr = _libc_mmap()(None, size, prot, flags, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                err = ctypes.get_errno()
                raise OSError(err, f"mmap of {path} for RAM block {idstr!r}: {os.strerror(err)}")
        finally:
            os.close(fd)
        block = cls.__new__(cls)
        block.addr = int(addr)
        block.fd = None
        block.idstr = idstr
        block.used_length = size
        block.page_size = page_size
        block.backing = "file"
        return block

    @property
    def closed(self) -> bool:
        return self.addr == 0

    @property
    def end(self) -> int:
        return self.addr + self.used_length

    def check_range(self, offset: int, length: int) -> None:
        """Raise ValueError unless [offset, offset+length) is inside the block and host-page aligned."""
        self._check_bytes(offset, length)
        if offset % self.page_size or length % self.page_size:
            raise ValueError(
                f"RAM block {self.idstr!r}: offset=0x{offset:x} length={length} is not aligned "
                f"to the host page size {self.page_size}"
            )

    def _check_bytes(self, offset: int, length: int) -> None:
        if self.closed:
            raise ValueError(f"RAM block {self.idstr!r} is closed")
        if not isinstance(offset, int) or not isinstance(length, int):
            raise TypeError(f"RAM block {self.idstr!r}: offset and length must be ints")
        if offset < 0 or length <= 0 or offset + length > self.used_length:
            raise ValueError(
                f"RAM block {self.idstr!r}: range offset=0x{offset:x} length={length} is outside "
                f"the block (used_length={self.used_length})"
            )

    def host_addr(self, offset: int, length: int = 1) -> int:
        """Address of ``offset`` after checking [offset, offset+length) is inside the block."""
        self._check_bytes(offset, length)
        return self.addr + offset

    def discard(self, offset: int, length: int) -> None:
        """Make the range missing again (a MISSING-mode uffd will fault on it).

        anon: MADV_DONTNEED; memfd/hugetlbfs: fallocate(PUNCH_HOLE|KEEP_SIZE),
        which also drops the page cache so a shared mapping faults too. With a
        uffd registered for Feature.EVENT_REMOVE this blocks until the event is
        read, so call it from another thread than the event reader.
        """
        self.check_range(offset, length)
        if self.fd is None:
            rc = lib.pc_mem_madvise_dontneed(self.addr + offset, length)
            what = "madvise(MADV_DONTNEED)"
        else:
            rc = lib.pc_mem_punch_hole(self.fd, offset, length)
            what = "fallocate(PUNCH_HOLE)"
        if rc < 0:
            raise OSError(
                -rc,
                f"{what} of RAM block {self.idstr!r} offset=0x{offset:x} length={length}: {os.strerror(-rc)}",
            )

    def prefill(self) -> None:
        """Allocate every page of a "hugetlbfs" or "memfd" block now (zeroed by the kernel), as
        QEMU's mem-prealloc does, and map them all in the second mapping (alias): a destination
        then places each page with a copy onto memory that needs no allocation, zeroing or page
        fault on the migration's clock (DestinationPath). A huge-page block's pages are reserved
        for it from its creation anyway; a 4 KiB one holds every page from now on, zeros too."""
        if self.backing not in ("hugetlbfs", "memfd") or self.fd is None:
            raise ValueError(f"RAM block {self.idstr!r}: {self.backing} memory cannot be prefilled "
                             f"(only a hugetlbfs or memfd one)")
        rc = lib.pc_mem_prefill(self.fd, 0, self.used_length)
        if rc < 0:
            hint = (f"; {free_hugepages(self.page_size)} free {self.page_size >> 20} MiB hugepages"
                    if self.backing == "hugetlbfs" else "")
            raise OSError(-rc, f"fallocate of RAM block {self.idstr!r} ({self.used_length} bytes): "
                               f"{os.strerror(-rc)}{hint}")
        # 4 KiB pages: a page fault each at its first write through the alias otherwise (~2 us
        # on a virtual machine); a huge page's one fault is nothing beside its 2 MiB copy
        if self.backing == "memfd" and (rc := lib.pc_mem_populate_write(self.alias(), self.used_length)) < 0:
            raise OSError(-rc, f"madvise(MADV_POPULATE_WRITE) of RAM block {self.idstr!r}'s second mapping: "
                               f"{os.strerror(-rc)}")
        self.prefilled = True

    def alias(self) -> int:
        """Address of a second shared mapping of the block's file (made once, unmapped by
        close()): writes there land in the same pages without touching this mapping, which
        may be registered with a userfaultfd."""
        if self.fd is None:
            raise ValueError(f"RAM block {self.idstr!r} ({self.backing}) has no file to map twice")
        if not self._alias:
            out = ffi.new("uint64_t *")
            rc = lib.pc_mem_map(self.fd, self.used_length, out)
            if rc < 0:
                raise OSError(-rc, f"second mapping of RAM block {self.idstr!r}: {os.strerror(-rc)}")
            self._alias = int(out[0])
        return self._alias

    def view(self) -> memoryview:
        """A writable memoryview of the whole block.

        Never touch it while the block is uffd-registered and has missing
        pages: a fault taken while holding the GIL deadlocks the process. It
        also dangles after close().
        """
        if self.closed:
            raise ValueError(f"RAM block {self.idstr!r} is closed")
        return memoryview(ffi.buffer(ffi.cast("char *", self.addr), self.used_length))

    def close(self) -> None:
        """Unmap (and close the fd). Blocks until read if a uffd wants EVENT_UNMAP."""
        addr, self.addr = self.addr, 0
        if addr:
            lib.pc_mem_unmap(addr, self.used_length)
        alias, self._alias = self._alias, 0
        if alias:
            lib.pc_mem_unmap(alias, self.used_length)
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> RamBlock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "addr", 0) or getattr(self, "fd", None) is not None:
            self.close()

    def __repr__(self) -> str:
        return (
            f"<RamBlock {self.idstr!r} {self.backing} addr=0x{self.addr:x} "
            f"used_length={self.used_length} page_size={self.page_size}>"
        )


class GuestMemory:
    """The RAM blocks of one guest, looked up by idstr or host address."""

    def __init__(self, blocks: Iterable[RamBlock]) -> None:
        self.blocks: tuple[RamBlock, ...] = tuple(blocks)
        self._by_id: dict[str, RamBlock] = {}
        for b in self.blocks:
            if b.idstr in self._by_id:
                raise ValueError(f"duplicate RAM block idstr {b.idstr!r}")
            if b.closed:
                raise ValueError(f"RAM block {b.idstr!r} is closed")
            self._by_id[b.idstr] = b
        self._sorted = sorted(self.blocks, key=lambda b: b.addr)
        self._bases = [b.addr for b in self._sorted]

    def block(self, idstr: str) -> RamBlock:
        try:
            return self._by_id[idstr]
        except KeyError:
            raise UnknownBlockError(
                f"unknown RAM block {idstr!r}; known: {', '.join(map(repr, self._by_id)) or 'none'}"
            ) from None

    def block_at(self, addr: int) -> tuple[RamBlock, int] | None:
        """(block, offset) of the block containing host address ``addr``, or None."""
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        b = self._sorted[i]
        off = addr - b.addr
        return (b, off) if off < b.used_length else None

    @property
    def total_bytes(self) -> int:
        return sum(b.used_length for b in self.blocks)

    def __iter__(self) -> Iterator[RamBlock]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def close(self) -> None:
        for b in self.blocks:
            b.close()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
