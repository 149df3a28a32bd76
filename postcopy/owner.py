"""The seam between the roles and whoever owns guest memory.

A role never builds a guest: it is handed a :class:`MemoryOwner`, which owns
the RAM blocks and the device state and starts or stops whatever runs on that
memory. Two owners live here:

* :class:`BuiltinGuest`: the built-in synthetic guest (vCPU threads in C), the
  project's test bed;
* :class:`HeadlessMemory`: memory with no guest. As a destination it creates
  whatever RAM blocks the stream's setup declares and keeps the device state
  as received (a QEMU stream, a snapshot, memory served to another process);
  as a source it sends memory it was given with saved device state
  (:func:`memory_from_file`: the contents of a memory file);
* :class:`RemoteMemory`: another process's memory behind its userfaultfd (a
  VMM that handed its uffd over, Firecracker style), as a destination: the
  stream's one RAM block lives there, in regions mapped by file offset.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from uffd import PAGE_4K, GuestMemory, RamBlock
from uffd._native import lib

from . import wire
from ._datapath import RemoteBlock, RemoteRegion
from .guest import Guest, Pattern
from .session import MigrationFailed
from .touch import TouchPattern, TouchReader, TouchStats
from .spec import DEVICE_IDSTR, DEVICE_VERSION, GuestSpec, SpecError, decode_device_state, encode_device_state

__all__ = [
    "BuiltinGuest",
    "DestinationMemory",
    "HeadlessMemory",
    "MemoryOwner",
    "RemoteMemory",
    "SourceMemory",
    "WriterProcess",
    "memory_from_file",
]

#: The machine type our own configuration section names.
BUILTIN_MACHINE_TYPE = "postcopy-builtin-1"
DEVICE_SECTION_ID = 3
#: Times a role plays its device state save (source) or load (destination) before the stream:
#: past the interpreter's specialization threshold of 8.
DEVICE_STATE_REHEARSALS = 10


@dataclass(frozen=True, slots=True)
class WriterProcess:
    """Source, precopy: whose page tables show the guest's writes.

    ``pid`` 0 is this process. Soft-dirty tracking needs only the pid
    (``/proc/PID/clear_refs`` and ``pagemap``); write-protect tracking of
    another process also needs a userfaultfd that process made (``uffd``,
    received over SCM_RIGHTS), since a userfaultfd acts on its maker's memory.
    """

    pid: int = 0
    uffd: int = -1


class _Memory(Protocol):
    def ram_blocks(self) -> Sequence[RamBlock]:
        """The blocks as they are now (source: what to send)."""

    def close(self) -> None:
        """Release the memory and whatever runs on it."""


class SourceMemory(_Memory, Protocol):
    """What a source needs from whoever owns the memory it sends."""

    def configuration(self) -> wire.Configuration:
        """The configuration section the stream starts with."""

    def stop(self) -> None:
        """Stop the guest (the downtime starts)."""

    def writer_process(self) -> WriterProcess:
        """Precopy: the process that writes this memory (dirty tracking watches it)."""

    def freeze_writers(self) -> None:
        """Precopy: hold every writer for a moment (soft-dirty's read-and-clear)."""

    def thaw_writers(self) -> None:
        """Let them run again."""

    def throttle(self, percent: int) -> None:
        """Precopy (auto-converge): let the writers run only ``100 - percent`` % of
        the time from now on (0: full speed again). An owner with no writer ignores it."""

    def set_writer_nice(self, nice: int | None) -> None:
        """Precopy: run the writers' threads at ``nice`` (the migration's threads go
        first); None: each back at the nice it had. An owner with no writer ignores it.
        Raises OSError (PermissionError: raising a priority needs CAP_SYS_NICE)."""

    def save_device_state(self) -> tuple[wire.DeviceSection, ...]:
        """Guest stopped: its device state, sent inside PACKAGED."""


class DestinationMemory(_Memory, Protocol):
    """What a destination needs from whoever owns the memory it fills."""

    def block_page_sizes(self) -> dict[str, int]:
        """Host page sizes this owner knows for blocks by idstr (the stream may not say)."""

    def provide_blocks(self, layout: wire.RamLayout) -> Sequence[RamBlock]:
        """The blocks for the stream's RAM setup, in its order; raises
        :class:`MigrationFailed` ("ram_layout") when this owner cannot hold them."""

    def load_device_state(self, sections: Sequence[wire.DeviceSection], *,
                          configuration: wire.Configuration | None = None, in_package: Sequence[bool] = ()) -> None:
        """At RUN: the device state received (every device section in stream order,
        the configuration section, whether each section came inside PACKAGED); raises MigrationFailed."""

    def start(self) -> None:
        """At RUN: run the guest on this memory."""

    def vcpu_thread_ids(self) -> Sequence[int]:
        """Threads whose blocked time is QEMU's postcopy blocktime (may be empty)."""

    def reset(self) -> None:
        """Before RUN: forget everything received (the stream starts over)."""


class MemoryOwner(SourceMemory, DestinationMemory, Protocol):
    """An owner that can be either end (the built-in guest, headless memory)."""


class BuiltinGuest:
    """The built-in guest of ``spec``. On a source, pass the running ``guest`` and
    its ``memory``; on a destination, neither (both are built here). A destination
    allocates all its memory before the stream (``prealloc``, see _prefill)."""

    def __init__(self, spec: GuestSpec, memory: GuestMemory | None = None, guest: Guest | None = None,
                 *, prealloc: bool = True) -> None:
        self.spec = spec
        self._owns_memory = memory is None
        self.memory = memory if memory is not None else spec.build_memory(prealloc)
        if self._owns_memory:
            self._prefill()
        self.guest = guest
        # The vCPUs' nice: this (setup) thread's. The destination starts the guest on a
        # thread of the switch's path, raised above the guest.
        self._vcpu_nice = os.getpriority(os.PRIO_PROCESS, 0)
        # A destination's guest, built now and started at RUN: building it (~0.2 ms) is no part
        # of the downtime then
        self._unstarted: Guest | None = self._new_guest() if self._owns_memory else None
        self._state: bytes | None = None
        self.stopped_ns = 0
        self.source_stopped_ns = 0
        if guest is not None:
            # a rehearsal of the save's Python: its first runs cost ~0.1 ms more, in the downtime
            for _ in range(DEVICE_STATE_REHEARSALS):
                self._device_sections(bytes(guest.state_size()), 0)
        if self._unstarted is not None:
            self._rehearse_load(self._unstarted)
            self._unstarted.prepare()   # its vCPU threads made now, parked: RUN releases them

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

    def writer_process(self) -> WriterProcess:
        return WriterProcess()      # the vCPUs are threads of this process

    def freeze_writers(self) -> None:
        if self.guest is not None:
            self.guest.stop()

    def thaw_writers(self) -> None:
        if self.guest is not None:
            self.guest.start()

    def throttle(self, percent: int) -> None:
        """The vCPU threads sleep ``percent`` % of the time (10 ms slices, in C)."""
        if self.guest is not None:
            self.guest.set_throttle(percent)

    def set_writer_nice(self, nice: int | None) -> None:
        """The vCPU threads (running, and started later: after a freeze) at ``nice`` (C)."""
        if self.guest is not None:
            self.guest.set_vcpu_nice(nice)

    def save_device_state(self) -> tuple[wire.DeviceSection, ...]:
        if self.guest is None:
            raise RuntimeError("no guest to save")
        return self._device_sections(self.guest.save_state(), self.stopped_ns)

    def _device_sections(self, state: bytes, stopped_ns: int) -> tuple[wire.DeviceSection, ...]:
        payload = encode_device_state(self.spec, state, stopped_ns)
        return (wire.DeviceSection(section_id=DEVICE_SECTION_ID, idstr=DEVICE_IDSTR, instance_id=0,
                                   version_id=DEVICE_VERSION, payload=payload),)

    def load_device_state(self, sections: Sequence[wire.DeviceSection], *,
                          configuration: wire.Configuration | None = None, in_package: Sequence[bool] = ()) -> None:
        self._state, self.source_stopped_ns = self._decoded(sections)

    def _decoded(self, sections: Sequence[wire.DeviceSection]) -> tuple[bytes, int]:
        """The guest state and the source's stop time in our device section."""
        ours = [s for s in sections if s.idstr == DEVICE_IDSTR]
        if not ours:
            raise MigrationFailed("no_device_state", f"PACKAGED carried no {DEVICE_IDSTR!r} section before RUN")
        try:
            return decode_device_state(ours[-1].payload, self.spec)
        except (SpecError, ValueError) as exc:
            raise MigrationFailed("device_state", str(exc)) from None

    def _rehearse_load(self, guest: Guest) -> None:
        """RUN's device state load, played with the unstarted guest's own state (a no-op for it):
        its Python ran 80-150 us the first time, in the downtime, against ~15 us once it had run."""
        for _ in range(DEVICE_STATE_REHEARSALS):
            state, _ = self._decoded(self._device_sections(guest.save_state(), 0))
            guest.load_state(state)

    def _new_guest(self) -> Guest:
        s = self.spec
        return Guest([(b.addr, b.used_length, b.page_size) for b in self.memory],
                     nvcpus=s.vcpus, pattern=Pattern[s.pattern.upper()], seed=s.seed,
                     write_percent=s.write_percent, rate_limit=s.rate_limit, nice=self._vcpu_nice)

    def start(self) -> None:
        assert self._state is not None, "load_device_state first"
        guest, self._unstarted = self._unstarted or self._new_guest(), None
        self.guest = guest
        guest.load_state(self._state)
        guest.start()

    def vcpu_thread_ids(self) -> Sequence[int]:
        return self.guest.vcpu_tids() if self.guest is not None else []

    def _prefill(self) -> None:
        """A destination's pages, allocated before any stream: placing one is then a copy onto
        memory that is already there (see RamBlock.prefill). Allocating memory is the slow part
        of placing a page where the first touch of memory costs (a virtual machine whose host
        backs its memory lazily: 20-60 us a 4 KiB page on a fresh one here, against ~1.5 us for
        a whole placement); here it is paid before the source stops its guest."""
        for b in self.memory:
            if b.backing in ("hugetlbfs", "memfd"):
                b.prefill()

    def reset(self) -> None:
        self._state = None
        for b in self.memory:
            b.discard(0, b.used_length)
        if self._owns_memory:
            self._prefill()

    def request_stop(self) -> None:
        """Ask the vCPUs to stop without waiting (they may be blocked on faults)."""
        if self.guest is not None:
            self.guest.request_stop()

    def close(self) -> None:
        if self._unstarted is not None:
            self._unstarted.close()
            self._unstarted = None
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
                 page_sizes: dict[str, int] | None = None, backing_2m: str = "hugetlbfs",
                 writer: WriterProcess | None = None, touch: TouchPattern | None = None) -> None:
        """``touch``: as a destination, read the memory in this pattern from RUN on (:mod:`postcopy.touch`)."""
        self.memory = memory
        self.touch = touch
        self.toucher: TouchReader | None = None
        self.writer = writer or WriterProcess()
        self.device_sections = tuple(device_sections)
        self.in_package: tuple[bool, ...] = (True,) * len(self.device_sections)
        self._configuration = configuration or wire.Configuration(machine_type=BUILTIN_MACHINE_TYPE)
        self._page_sizes = dict(page_sizes or {})
        self._backing_huge = backing_2m
        self._duty: _DutyCycle | None = None
        self._nice: _ThreadNice | None = None

    def block_page_sizes(self) -> dict[str, int]:
        if self.memory is not None:
            return {b.idstr: b.page_size for b in self.memory if b.page_size != PAGE_4K}
        return dict(self._page_sizes)

    def provide_blocks(self, layout: wire.RamLayout) -> Sequence[RamBlock]:
        if self.touch is not None and layout.index(self.touch.idstr) is None:
            names = ", ".join(b.idstr for b in layout.blocks)
            raise MigrationFailed("ram_layout", f"--touch {self.touch.idstr}: the stream has no such RAM block "
                                                f"(it declares {names})")
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

    def writer_process(self) -> WriterProcess:
        return self.writer

    def freeze_writers(self) -> None:
        """Another process writes this memory: SIGSTOP it and wait until it stopped."""
        if self.writer.pid:
            os.kill(self.writer.pid, signal.SIGSTOP)
            deadline = time.monotonic() + 5.0
            while _proc_state(self.writer.pid) not in ("T", "t") and time.monotonic() < deadline:
                time.sleep(0.0005)

    def thaw_writers(self) -> None:
        if self.writer.pid:
            os.kill(self.writer.pid, signal.SIGCONT)

    def throttle(self, percent: int) -> None:
        """Another process writes this memory: SIGSTOP/SIGCONT duty cycles (100 ms periods,
        stopped ``percent`` % of each). No writer process (pid 0: memory nobody else writes):
        nothing to do."""
        if not self.writer.pid:
            return
        if self._duty is None:
            self._duty = _DutyCycle(self.writer.pid)
        self._duty.set(percent)

    def set_writer_nice(self, nice: int | None) -> None:
        """Another process writes this memory: every thread of it (``/proc/PID/task``) at
        ``nice``, each one's own remembered; None: back as they were (threads it made
        meanwhile inherited the lowered nice: they get its main thread's). No writer
        process: nothing to do."""
        if not self.writer.pid:
            return
        if self._nice is None:
            self._nice = _ThreadNice(self.writer.pid)
        self._nice.set(nice)

    def save_device_state(self) -> tuple[wire.DeviceSection, ...]:
        return self.device_sections

    def load_device_state(self, sections: Sequence[wire.DeviceSection], *,
                          configuration: wire.Configuration | None = None, in_package: Sequence[bool] = ()) -> None:
        self.device_sections = tuple(sections)
        self.in_package = tuple(in_package) or (True,) * len(self.device_sections)
        if configuration is not None:
            self._configuration = configuration

    def start(self) -> None:
        if self.touch is not None and self.memory is not None and self.toucher is None:
            block = next(b for b in self.memory if b.idstr == self.touch.idstr)
            self.toucher = TouchReader(block, self.touch)
            self.toucher.start()

    def touch_stats(self) -> TouchStats | None:
        return self.toucher.stats() if self.toucher is not None else None

    def vcpu_thread_ids(self) -> Sequence[int]:
        return []

    def reset(self) -> None:
        self.device_sections = ()
        self.in_package = ()
        if self.memory is not None:
            for b in self.memory:
                b.discard(0, b.used_length)

    def close(self) -> None:
        if self._duty is not None:
            self._duty.set(0)
        if self._nice is not None:
            with contextlib.suppress(OSError):
                self._nice.set(None)
        if self.toucher is not None and not self.toucher.stop():
            return      # a read still waits in the memory: leave it mapped rather than unmap it under the reader
        if self.memory is not None:
            self.memory.close()


def memory_from_file(path: str, idstr: str = "mem", page_size: int = PAGE_4K) -> GuestMemory:
    """One RAM block ``idstr`` holding the whole file (a source's memory, e.g. a
    Firecracker snapshot's memory file); its size must be a multiple of ``page_size``."""
    import os

    size = os.stat(path).st_size
    if size == 0 or size % page_size:
        raise ValueError(f"memory file {path}: {size} bytes is not a positive multiple of the page size {page_size}")
    block = RamBlock(idstr, size, page_size, "anon" if page_size == PAGE_4K else "hugetlbfs")
    try:
        view = block.view()
        with open(path, "rb", buffering=0) as f:
            done = 0
            while done < size:
                n = f.readinto(view[done:done + (64 << 20)])
                if not n:
                    raise ValueError(f"memory file {path} shrank while read ({done} of {size} bytes)")
                done += n
        view.release()
    except BaseException:
        block.close()
        raise
    return GuestMemory([block])


class RemoteMemory:
    """Another process's memory behind its userfaultfd, as a destination.

    ``regions`` are (address in that process, size, offset in the stream's one
    RAM block, page size), e.g. Firecracker's GuestRegionUffdMapping with the
    block being the memory file. The block the stream declares must hold every
    region and have their page size; its pages are placed through ``uffd`` and
    that process's faults are read from it (see _datapath.RemoteBlock). The
    memory cannot be discarded or reset from here: a placed page stays placed.
    """

    def __init__(self, uffd: int, regions: Sequence[tuple[int, int, int, int]]) -> None:
        if not regions:
            raise ValueError("no regions")
        sizes = {r[3] for r in regions}
        if len(sizes) != 1:
            raise ValueError(f"regions of several page sizes {sorted(sizes)}: a stream's block has one")
        self.uffd = uffd
        self.regions = tuple(regions)
        self.page_size = sizes.pop()
        self.span = max(offset + size for _b, size, offset, _p in self.regions)
        self.device_sections: tuple[wire.DeviceSection, ...] = ()
        self._blocks: list[RamBlock] = []

    def block_page_sizes(self) -> dict[str, int]:
        return {}       # the stream names its block; provide_blocks checks the page size it declares

    def provide_blocks(self, layout: wire.RamLayout) -> Sequence[RamBlock]:
        theirs = [(b.idstr, b.used_length, b.host_page_size) for b in layout.blocks]
        if len(layout.blocks) != 1:
            raise MigrationFailed("ram_layout", f"the stream declares RAM blocks {theirs}; live postcopy into another "
                                                "process's memory takes exactly one (the memory file)")
        (b,) = layout.blocks
        if b.used_length < self.span or b.host_page_size != self.page_size:
            raise MigrationFailed("ram_layout", f"the stream's block {b.idstr!r} ({b.used_length:#x} bytes, pages of "
                                                f"{b.host_page_size}) cannot hold the regions, which reach file offset "
                                                f"{self.span:#x} with pages of {self.page_size}")
        regions = [RemoteRegion(base, size, offset) for base, size, offset, _ps in self.regions]
        self._blocks = [RemoteBlock(b.idstr, b.used_length, b.host_page_size, self.uffd, regions, 0)]
        return list(self._blocks)

    def ram_blocks(self) -> Sequence[RamBlock]:
        return list(self._blocks)

    def load_device_state(self, sections: Sequence[wire.DeviceSection], *,
                          configuration: wire.Configuration | None = None, in_package: Sequence[bool] = ()) -> None:
        self.device_sections = tuple(sections)

    def start(self) -> None:
        pass        # that process runs already; its faults wait for the stream

    def vcpu_thread_ids(self) -> Sequence[int]:
        return []

    def reset(self) -> None:
        if self._blocks:
            raise MigrationFailed("reset", "the stream broke before RUN and would start over, but pages already "
                                           "placed in another process's memory cannot be taken back")

    def hand_back(self) -> None:
        """After the migration: unregister every region from the uffd, so that process
        runs on its own memory (its later MADV_DONTNEED reads zeros without us)."""
        for base, size, _offset, _ps in self.regions:
            rc = lib.pc_uffd_unregister(self.uffd, base, size)
            if rc < 0 and rc != -3:     # ESRCH: that process is gone
                raise OSError(-rc, f"UFFDIO_UNREGISTER [{base:#x}, {base + size:#x})")

    def close(self) -> None:
        self._blocks = []


class _DutyCycle:
    """Throttle another process: SIGSTOP for ``percent`` % of every period, SIGCONT for the
    rest (a thread of ours; the process runs freely again at 0 % or when this ends)."""

    PERIOD = 0.1

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.percent = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def set(self, percent: int) -> None:
        with self._cond:
            self.percent = max(0, min(99, percent))
            self._cond.notify_all()
            if self.percent and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._run, name=f"throttle-{self.pid}", daemon=True)
                self._thread.start()
        if not self.percent and self._thread is not None:
            self._thread.join(1.0)
            self._thread = None

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    percent = self.percent
                if not percent:
                    return
                os.kill(self.pid, signal.SIGSTOP)
                try:
                    with self._cond:
                        self._cond.wait(self.PERIOD * percent / 100)
                finally:
                    os.kill(self.pid, signal.SIGCONT)
                with self._cond:
                    if self.percent:
                        self._cond.wait(self.PERIOD * (100 - self.percent) / 100)
        except ProcessLookupError:
            return      # the writer is gone


class _ThreadNice:
    """Another process's threads at a nice of ours, and back (setpriority per thread id:
    Linux's nice is per thread)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.saved: dict[int, int] = {}

    def _tids(self) -> list[int]:
        try:
            return [int(t) for t in os.listdir(f"/proc/{self.pid}/task")]
        except OSError:
            return []       # the writer is gone

    def set(self, nice: int | None) -> None:
        first: OSError | None = None
        if nice is not None:
            for tid in self._tids():
                try:
                    self.saved.setdefault(tid, os.getpriority(os.PRIO_PROCESS, tid))
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
                except ProcessLookupError:
                    continue        # that thread just ended
                except OSError as exc:
                    first = first or exc
        else:
            default = self.saved.get(self.pid, 0)
            for tid in self._tids():
                try:
                    os.setpriority(os.PRIO_PROCESS, tid, self.saved.get(tid, default))
                except ProcessLookupError:
                    continue
                except OSError as exc:
                    first = first or exc
            self.saved.clear()
        if first is not None:
            raise first


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"
