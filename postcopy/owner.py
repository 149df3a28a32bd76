"""The seam between the roles and whoever owns guest memory.

A role never builds a guest: it is handed a :class:`MemoryOwner`, which owns
the RAM blocks and the device state and starts or stops whatever runs on that
memory. Two owners live here:

* :class:`BuiltinGuest`: the built-in synthetic guest (vCPU threads in C), the
  project's test bed;
* :class:`HeadlessMemory`: memory with no guest. As a destination it creates
  whatever RAM blocks the stream's setup declares and keeps the device state
  as received (a QEMU stream, a snapshot, memory served to another process);
  as a source it sends memory it was given with saved device state.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from uffd import PAGE_4K, GuestMemory, RamBlock

from . import wire
from .guest import Guest, Pattern
from .session import MigrationFailed
from .spec import DEVICE_IDSTR, DEVICE_VERSION, GuestSpec, SpecError, decode_device_state, encode_device_state

__all__ = ["BuiltinGuest", "HeadlessMemory", "MemoryOwner"]

#: The machine type our own configuration section names.
BUILTIN_MACHINE_TYPE = "postcopy-builtin-1"
DEVICE_SECTION_ID = 3


class MemoryOwner(Protocol):
    """What a role needs from whoever owns guest memory."""

    def block_page_sizes(self) -> dict[str, int]:
        """Host page sizes this owner knows for blocks by idstr (the stream may not say)."""

    def provide_blocks(self, layout: wire.RamLayout) -> Sequence[RamBlock]:
        """Destination: the blocks for the stream's RAM setup, in its order; raises
        :class:`MigrationFailed` ("ram_layout") when this owner cannot hold them."""

    def ram_blocks(self) -> Sequence[RamBlock]:
        """The blocks as they are now (source: what to send)."""

    def configuration(self) -> wire.Configuration:
        """Source: the configuration section the stream starts with."""

    def stop(self) -> None:
        """Source: stop the guest (the downtime starts)."""

    def save_device_state(self) -> tuple[wire.DeviceSection, ...]:
        """Source, guest stopped: its device state, sent inside PACKAGED."""

    def load_device_state(self, sections: Sequence[wire.DeviceSection], *,
                          configuration: wire.Configuration | None = None, in_package: Sequence[bool] = ()) -> None:
        """Destination, at RUN: the device state received (every device section in stream order,
        the configuration section, whether each section came inside PACKAGED); raises MigrationFailed."""

    def start(self) -> None:
        """Destination, at RUN: run the guest on this memory."""

    def vcpu_thread_ids(self) -> Sequence[int]:
        """Threads whose blocked time is QEMU's postcopy blocktime (may be empty)."""

    def reset(self) -> None:
        """Destination, before RUN: forget everything received (the stream starts over)."""

    def close(self) -> None:
        """Release the memory and whatever runs on it."""


class BuiltinGuest:
    """The built-in guest of ``spec``. On a source, pass the running ``guest`` and
    its ``memory``; on a destination, neither (both are built here)."""

    def __init__(self, spec: GuestSpec, memory: GuestMemory | None = None, guest: Guest | None = None) -> None:
        self.spec = spec
        self._owns_memory = memory is None
        self.memory = memory if memory is not None else spec.build_memory()
        self.guest = guest
        self._state: bytes | None = None
        self.stopped_ns = 0
        self.source_stopped_ns = 0

    def block_page_sizes(self) -> dict[str, int]:
        return {b.idstr: b.page_size for b in self.memory if b.page_size != PAGE_4K}

    def provide_blocks(self, layout: wire.RamLayout) -> Sequence[RamBlock]:
        theirs = [(b.idstr, b.used_length) for b in layout.blocks]
        ours = [(b.idstr, b.used_length) for b in self.memory]
        if theirs != ours:
            raise MigrationFailed("ram_layout", f"the source's RAM blocks {theirs} differ from this destination's {ours}")
        return list(self.memory)

    def ram_blocks(self) -> Sequence[RamBlock]:
        return list(self.memory)

    def configuration(self) -> wire.Configuration:
        return wire.Configuration(machine_type=BUILTIN_MACHINE_TYPE)

    def stop(self) -> None:
        self.stopped_ns = time.monotonic_ns()
        if self.guest is not None:
            self.guest.stop()

    def save_device_state(self) -> tuple[wire.DeviceSection, ...]:
        if self.guest is None:
            raise RuntimeError("no guest to save")
        payload = encode_device_state(self.spec, self.guest.save_state(), self.stopped_ns)
        return (wire.DeviceSection(section_id=DEVICE_SECTION_ID, idstr=DEVICE_IDSTR, instance_id=0,
                                   version_id=DEVICE_VERSION, payload=payload),)

    def load_device_state(self, sections: Sequence[wire.DeviceSection], *,
                          configuration: wire.Configuration | None = None, in_package: Sequence[bool] = ()) -> None:
        ours = [s for s in sections if s.idstr == DEVICE_IDSTR]
        if not ours:
            raise MigrationFailed("no_device_state", f"PACKAGED carried no {DEVICE_IDSTR!r} section before RUN")
        try:
            self._state, self.source_stopped_ns = decode_device_state(ours[-1].payload, self.spec)
        except (SpecError, ValueError) as exc:
            raise MigrationFailed("device_state", str(exc)) from None

    def start(self) -> None:
        assert self._state is not None, "load_device_state first"
        s = self.spec
        self.guest = Guest(
            [(b.addr, b.used_length, b.page_size) for b in self.memory],
            nvcpus=s.vcpus, pattern=Pattern[s.pattern.upper()], seed=s.seed,
            write_percent=s.write_percent, rate_limit=s.rate_limit,
        )
        self.guest.load_state(self._state)
        self.guest.start()

    def vcpu_thread_ids(self) -> Sequence[int]:
        return self.guest.vcpu_tids() if self.guest is not None else []

    def reset(self) -> None:
        self._state = None
        for b in self.memory:
            b.discard(0, b.used_length)

    def request_stop(self) -> None:
        """Ask the vCPUs to stop without waiting (they may be blocked on faults)."""
        if self.guest is not None:
            self.guest.request_stop()

    def close(self) -> None:
        if self.guest is not None and self._owns_memory:
            self.guest.close()
            self.guest = None
        if self._owns_memory:
            self.memory.close()


class HeadlessMemory:
    """Guest memory with no guest: blocks made to the stream's measure (destination)
    or given (source), device state kept exactly as received or saved."""

    def __init__(self, memory: GuestMemory | None = None,
                 device_sections: Sequence[wire.DeviceSection] = (),
                 configuration: wire.Configuration | None = None,
                 page_sizes: dict[str, int] | None = None, backing_2m: str = "hugetlbfs") -> None:
        self.memory = memory
        self.device_sections = tuple(device_sections)
        self.in_package: tuple[bool, ...] = (True,) * len(self.device_sections)
        self._configuration = configuration or wire.Configuration(machine_type=BUILTIN_MACHINE_TYPE)
        self._page_sizes = dict(page_sizes or {})
        self._backing_huge = backing_2m

    def block_page_sizes(self) -> dict[str, int]:
        if self.memory is not None:
            return {b.idstr: b.page_size for b in self.memory if b.page_size != PAGE_4K}
        return dict(self._page_sizes)

    def provide_blocks(self, layout: wire.RamLayout) -> Sequence[RamBlock]:
        if self.memory is not None:
            theirs = [(b.idstr, b.used_length) for b in layout.blocks]
            ours = [(b.idstr, b.used_length) for b in self.memory]
            if theirs != ours:
                raise MigrationFailed("ram_layout", f"the stream's RAM blocks {theirs} differ from {ours}")
            return list(self.memory)
        made: list[RamBlock] = []
        try:
            for b in layout.blocks:
                backing = "anon" if b.host_page_size == PAGE_4K else self._backing_huge
                made.append(RamBlock(b.idstr, b.used_length, b.host_page_size, backing))  # type: ignore[arg-type]
        except (OSError, ValueError) as exc:
            for blk in made:
                blk.close()
            raise MigrationFailed("ram_layout", f"cannot create the stream's RAM blocks: {exc}") from None
        self.memory = GuestMemory(made)
        return made

    def ram_blocks(self) -> Sequence[RamBlock]:
        return list(self.memory) if self.memory is not None else []

    def configuration(self) -> wire.Configuration:
        return self._configuration

    def stop(self) -> None:
        pass

    def save_device_state(self) -> tuple[wire.DeviceSection, ...]:
        return self.device_sections

    def load_device_state(self, sections: Sequence[wire.DeviceSection], *,
                          configuration: wire.Configuration | None = None, in_package: Sequence[bool] = ()) -> None:
        self.device_sections = tuple(sections)
        self.in_package = tuple(in_package) or (True,) * len(self.device_sections)
        if configuration is not None:
            self._configuration = configuration

    def start(self) -> None:
        pass

    def vcpu_thread_ids(self) -> Sequence[int]:
        return []

    def reset(self) -> None:
        self.device_sections = ()
        self.in_package = ()
        if self.memory is not None:
            for b in self.memory:
                b.discard(0, b.used_length)

    def close(self) -> None:
        if self.memory is not None:
            self.memory.close()
