"""Memory owners for a saved VM (a snapshot directory, ``postcopy/snapshot.py``).

* :class:`SavingMemory` (destination, ``postcopy dest --save DIR``): headless
  memory made to the stream's measure; once the migration completed,
  :meth:`SavingMemory.save` writes it, the configuration section and every
  device section as received into DIR.
* :class:`SnapshotMemory` (source, ``postcopy source --from-snapshot DIR``):
  the snapshot's blocks, each a private map of its file (pages are read from
  the page cache as they are sent, nothing is loaded first), with its
  configuration and device state replayed as the source's own. A QEMU started
  with ``-incoming`` and the same machine arguments runs the saved VM at once
  and pulls its pages on demand: a lazy restore.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from uffd import GuestMemory, RamBlock

from . import wire
from .owner import HeadlessMemory, WriterProcess
from .session import MigrationFailed
from .snapshot import MANIFEST, Snapshot, SnapshotError, SnapshotWriter
from .touch import TouchPattern

__all__ = ["SavingMemory", "SnapshotMemory", "stream_head"]

_PAGE = wire.DEFAULT_TARGET_PAGE_SIZE
_CHUNK = 2 << 20
_ZERO_CHUNK = bytes(_CHUNK)
_ZERO_PAGE = bytes(_PAGE)


def stream_head(configuration: wire.Configuration) -> bytes:
    """The stream header and configuration section, as the source sent them."""
    return wire.encode(wire.StreamHeader()) + wire.encode(configuration)


class SavingMemory(HeadlessMemory):
    """Headless destination memory that becomes the snapshot directory ``directory``.

    The directory must not hold a snapshot yet (checked here, before any
    migration starts). 2 MiB / 1 GiB blocks are hugetlbfs memory while the
    migration runs (userfaultfd needs it); the snapshot's files are plain.
    """

    def __init__(self, directory: str | os.PathLike[str], *, backing_2m: str = "hugetlbfs",
                 touch: TouchPattern | None = None) -> None:
        super().__init__(backing_2m=backing_2m, touch=touch)
        self.directory = Path(directory)
        if (self.directory / MANIFEST).exists():
            raise SnapshotError(f"{self.directory}: already holds a snapshot ({MANIFEST} exists); "
                                "remove it or choose another directory")
        self.received_configuration: wire.Configuration | None = None
        self.saved: Snapshot | None = None

    def load_device_state(self, sections: Sequence[wire.DeviceSection], *,
                          configuration: wire.Configuration | None = None, in_package: Sequence[bool] = ()) -> None:
        if configuration is None:
            raise MigrationFailed("device_state", "the stream had no configuration section: there is no "
                                  "machine type to save the VM with")
        super().load_device_state(sections, configuration=configuration, in_package=in_package)
        self.received_configuration = configuration

    def reset(self) -> None:
        super().reset()
        self.received_configuration = None

    def save(self) -> Snapshot:
        """Write the snapshot (blocks sparse where zero; the manifest last). Call after the migration completed."""
        config = self.received_configuration
        if config is None or self.memory is None:
            raise SnapshotError(f"{self.directory}: nothing to save (no migration reached RUN)")
        blocks = list(self.memory)
        with SnapshotWriter(self.directory, [(b.idstr, b.used_length, b.page_size) for b in blocks],
                            machine_type=config.machine_type) as w:
            w.set_stream_head(stream_head(config))
            for b in blocks:
                _write_block(w, b)
            for section, packaged in zip(self.device_sections, self.in_package, strict=True):
                w.add_device(section, in_package=packaged)
            self.saved = w.commit()
        return self.saved


def _write_block(w: SnapshotWriter, block: RamBlock) -> None:
    """Copy a block into its file, leaving holes for zero target pages (one pwrite per nonzero run)."""
    fd = w.fileno(block.idstr)
    view = block.view()
    try:
        for base in range(0, block.used_length, _CHUNK):
            chunk = bytes(view[base : base + _CHUNK])
            if chunk == _ZERO_CHUNK[: len(chunk)]:
                continue
            run = -1
            for off in range(0, len(chunk) + _PAGE, _PAGE):
                nonzero = off < len(chunk) and chunk[off : off + _PAGE] != _ZERO_PAGE
                if nonzero and run < 0:
                    run = off
                elif not nonzero and run >= 0:
                    data = memoryview(chunk)[run:off]
                    pos = base + run
                    while data:
                        n = os.pwrite(fd, data, pos)
                        data, pos = data[n:], pos + n
                    run = -1
    finally:
        view.release()


class SnapshotMemory:
    """A saved VM as a source: the snapshot's blocks, configuration and device state."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        head = snapshot.stream_head()
        dec = wire.MainStreamDecoder()
        dec.receive_data(head)
        dec.receive_data(b"")       # the head ends here: no more configuration subsections
        first, second = dec.next_event(), dec.next_event()
        if not isinstance(first, wire.StreamHeader) or not isinstance(second, wire.Configuration):
            raise SnapshotError(f"{snapshot.directory}: the stream head holds {type(first).__name__}, "
                                f"{type(second).__name__}, not a header and a configuration section")
        if stream_head(second) != head:
            raise SnapshotError(f"{snapshot.directory}: the stream head has {len(head)} bytes that its "
                                "configuration section does not account for exactly")
        self._configuration = second
        self.device_sections = tuple(snapshot.device_sections())
        blocks: list[RamBlock] = []
        try:
            blocks.extend(RamBlock.map_file(b.idstr, snapshot.path(b.idstr), b.page_size) for b in snapshot.blocks)
        except (OSError, ValueError) as exc:
            for blk in blocks:
                blk.close()
            raise SnapshotError(f"{snapshot.directory}: cannot map the block files: {exc}") from None
        self.memory = GuestMemory(blocks)

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> SnapshotMemory:
        return cls(Snapshot.open(directory))

    def ram_blocks(self) -> Sequence[RamBlock]:
        return list(self.memory)

    def configuration(self) -> wire.Configuration:
        return self._configuration

    def stop(self) -> None:
        pass        # nothing runs: the saved VM stopped when it was saved

    def writer_process(self) -> WriterProcess:
        return WriterProcess()      # nothing writes a saved VM's memory

    def freeze_writers(self) -> None:
        pass

    def thaw_writers(self) -> None:
        pass

    def throttle(self, percent: int) -> None:
        pass        # a saved VM: nothing runs on this memory

    def set_writer_nice(self, nice: int | None) -> None:
        pass

    def save_device_state(self) -> tuple[wire.DeviceSection, ...]:
        return self.device_sections

    def close(self) -> None:
        self.memory.close()
