"""Flag and enum types for userfaultfd, with values taken from the C headers."""

from __future__ import annotations

import enum

from ._lowlevel import lib

__all__ = [
    "ContinueMode",
    "CopyMode",
    "EventType",
    "FaultFlag",
    "FaultStatus",
    "Feature",
    "Ioctl",
    "RegisterMode",
    "ZeropageMode",
]


class Feature(enum.IntFlag):
    """UFFD_FEATURE_* (kernel prefix dropped)."""

    PAGEFAULT_FLAG_WP = lib.UFFD_FEATURE_PAGEFAULT_FLAG_WP
    EVENT_FORK = lib.UFFD_FEATURE_EVENT_FORK
    EVENT_REMAP = lib.UFFD_FEATURE_EVENT_REMAP
    EVENT_REMOVE = lib.UFFD_FEATURE_EVENT_REMOVE
    MISSING_HUGETLBFS = lib.UFFD_FEATURE_MISSING_HUGETLBFS
    MISSING_SHMEM = lib.UFFD_FEATURE_MISSING_SHMEM
    EVENT_UNMAP = lib.UFFD_FEATURE_EVENT_UNMAP
    SIGBUS = lib.UFFD_FEATURE_SIGBUS
    THREAD_ID = lib.UFFD_FEATURE_THREAD_ID
    MINOR_HUGETLBFS = lib.UFFD_FEATURE_MINOR_HUGETLBFS
    MINOR_SHMEM = lib.UFFD_FEATURE_MINOR_SHMEM
    EXACT_ADDRESS = lib.UFFD_FEATURE_EXACT_ADDRESS
    WP_HUGETLBFS_SHMEM = lib.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    WP_UNPOPULATED = lib.UFFD_FEATURE_WP_UNPOPULATED
    POISON = lib.UFFD_FEATURE_POISON
    WP_ASYNC = lib.UFFD_FEATURE_WP_ASYNC
    MOVE = lib.UFFD_FEATURE_MOVE


class RegisterMode(enum.IntFlag):
    MISSING = lib.UFFDIO_REGISTER_MODE_MISSING
    WP = lib.UFFDIO_REGISTER_MODE_WP
    MINOR = lib.UFFDIO_REGISTER_MODE_MINOR


class Ioctl(enum.IntFlag):
    """Bits of uffdio_api.ioctls / uffdio_register.ioctls: 1 << _UFFDIO_*."""

    REGISTER = 1 << lib._UFFDIO_REGISTER
    UNREGISTER = 1 << lib._UFFDIO_UNREGISTER
    WAKE = 1 << lib._UFFDIO_WAKE
    COPY = 1 << lib._UFFDIO_COPY
    ZEROPAGE = 1 << lib._UFFDIO_ZEROPAGE
    MOVE = 1 << lib._UFFDIO_MOVE
    WRITEPROTECT = 1 << lib._UFFDIO_WRITEPROTECT
    CONTINUE = 1 << lib._UFFDIO_CONTINUE
    POISON = 1 << lib._UFFDIO_POISON
    API = 1 << lib._UFFDIO_API


class CopyMode(enum.IntFlag):
    DONTWAKE = lib.UFFDIO_COPY_MODE_DONTWAKE
    WP = lib.UFFDIO_COPY_MODE_WP


class ZeropageMode(enum.IntFlag):
    DONTWAKE = lib.UFFDIO_ZEROPAGE_MODE_DONTWAKE


class ContinueMode(enum.IntFlag):
    DONTWAKE = lib.UFFDIO_CONTINUE_MODE_DONTWAKE
    WP = lib.UFFDIO_CONTINUE_MODE_WP


class FaultFlag(enum.IntFlag):
    """UFFD_PAGEFAULT_FLAG_*: no flag set means a read fault on a missing page."""

    WRITE = lib.UFFD_PAGEFAULT_FLAG_WRITE
    WP = lib.UFFD_PAGEFAULT_FLAG_WP
    MINOR = lib.UFFD_PAGEFAULT_FLAG_MINOR


class EventType(enum.IntEnum):
    PAGEFAULT = lib.UFFD_EVENT_PAGEFAULT
    FORK = lib.UFFD_EVENT_FORK
    REMAP = lib.UFFD_EVENT_REMAP
    REMOVE = lib.UFFD_EVENT_REMOVE
    UNMAP = lib.UFFD_EVENT_UNMAP


class FaultStatus(enum.IntEnum):
    """What the C fault reader decided for one fault (pc_fault.status)."""

    NEW = lib.PC_FAULT_NEW
    ALREADY_REQUESTED = lib.PC_FAULT_ALREADY_REQUESTED
    OUTSIDE = lib.PC_FAULT_OUTSIDE
