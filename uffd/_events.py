"""Events read from a userfaultfd (non-bulk path: one Python object per event)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._flags import EventType, FaultFlag

__all__ = ["Fork", "PageFault", "Remap", "Remove", "UffdEvent", "Unmap", "event_from_c"]


@dataclass(frozen=True, slots=True)
class PageFault:
    """A thread faulted at ``address`` (page-aligned unless EXACT_ADDRESS)."""

    address: int
    flags: FaultFlag
    tid: int | None
    """Faulting thread id; only when Feature.THREAD_ID was enabled."""


@dataclass(frozen=True, slots=True)
class Fork:
    """The process forked; ``fd`` is the child's new userfaultfd, now owned by the caller."""

    fd: int


@dataclass(frozen=True, slots=True)
class Remap:
    """mremap() moved ``length`` bytes of registered memory from ``old`` to ``new``."""

    old: int
    new: int
    length: int


@dataclass(frozen=True, slots=True)
class Remove:
    """[start, end) was discarded (MADV_DONTNEED/REMOVE): it is missing again."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Unmap:
    """[start, end) was unmapped."""

    start: int
    end: int


UffdEvent = PageFault | Fork | Remap | Remove | Unmap


def event_from_c(ev: Any, thread_id: bool) -> UffdEvent:
    """Convert one ``pc_uffd_event`` (cffi cdata) into its dataclass."""
    kind = ev.event
    if kind == EventType.PAGEFAULT:
        return PageFault(ev.a, FaultFlag(ev.b), ev.tid if thread_id else None)
    if kind == EventType.FORK:
        return Fork(ev.ufd)
    if kind == EventType.REMAP:
        return Remap(ev.a, ev.b, ev.c)
    if kind == EventType.REMOVE:
        return Remove(ev.a, ev.b)
    if kind == EventType.UNMAP:
        return Unmap(ev.a, ev.b)
    raise ValueError(f"unknown userfaultfd event type 0x{kind:x}")
