"""A saved VM on disk: one raw file per RAM block plus the device state as received.

Layout (docs/snapshot.md)::

    DIR/manifest.json        {"format": "postcopy-snapshot-1", "blocks": [...], ...}   written last
    DIR/ram/NNN-<idstr>.raw  one file per RAM block, exactly used_length bytes, sparse where zero
    DIR/stream-head.bin      the stream header and configuration section, bytes as received
    DIR/devices.bin          every non-RAM device section (FULL, with its footer) in stream order

The writer creates the block files at their final size (all holes), so a
destination can ``mmap(MAP_SHARED)`` each one as a RAM block (or ``pwrite``
pages into it) and the pages it never writes stay holes.  The manifest is
written last, atomically: a directory without one is an unfinished snapshot.
The reader checks everything strictly and says what is wrong in one sentence.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import json
import mmap
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postcopy.wire import DeviceSection, encode

__all__ = [
    "FORMAT",
    "Snapshot",
    "SnapshotBlock",
    "SnapshotDevice",
    "SnapshotError",
    "SnapshotWriter",
]

FORMAT = "postcopy-snapshot-1"
MANIFEST = "manifest.json"
STREAM_HEAD = "stream-head.bin"
DEVICES = "devices.bin"
_TOP_KEYS = {"format", "target_page_size", "machine_type", "blocks", "stream_head", "devices"}
_BLOCK_KEYS = {"idstr", "used_length", "page_size", "file"}
_DEVICE_KEYS = {"idstr", "section_id", "instance_id", "version_id", "in_package", "offset", "length"}

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class SnapshotError(Exception):
    """A snapshot directory is missing, incomplete or malformed (message names the file and value)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotBlock:
    """One RAM block: its name, size, page size and raw file (relative to the directory)."""

    idstr: str
    used_length: int
    page_size: int
    file: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotDevice:
    """One device section as received: where its exact bytes sit in ``devices.bin``."""

    idstr: str
    section_id: int
    instance_id: int
    version_id: int
    in_package: bool
    offset: int
    length: int


def _block_file(index: int, idstr: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", idstr).strip("._") or "block"
    return f"ram/{index:03d}-{safe}.raw"


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@functools.cache
def _fallocate() -> Any:
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = lib.fallocate
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int
    return fn


class SnapshotWriter:
    """Creates a snapshot directory; blocks are open for writing until :meth:`commit`.

    ``blocks``: ``(idstr, used_length, page_size)`` in the stream's order.
    Pages go in with :meth:`write` (pwrite; all-zero data is skipped, the file
    being a hole there) or through :meth:`mmap` (``MAP_SHARED``: what a
    destination places into it lands in the file).
    """

    def __init__(self, directory: str | os.PathLike[str], blocks: Sequence[tuple[str, int, int]], *,
                 target_page_size: int = 4096, machine_type: str | None = None) -> None:
        self.directory = Path(directory)
        if (self.directory / MANIFEST).exists():
            raise SnapshotError(f"{self.directory}: already holds a snapshot ({MANIFEST} exists); "
                                "remove it or choose another directory")
        if not _is_pow2(target_page_size):
            raise SnapshotError(f"target page size {target_page_size} is not a power of two")
        self.target_page_size = target_page_size
        self.machine_type = machine_type
        self.blocks: list[SnapshotBlock] = []
        seen: set[str] = set()
        for i, (idstr, used, psize) in enumerate(blocks):
            _check_block(str(self.directory), idstr, used, psize, target_page_size, seen)
            self.blocks.append(SnapshotBlock(idstr=idstr, used_length=used, page_size=psize,
                                             file=_block_file(i, idstr)))
        (self.directory / "ram").mkdir(parents=True, exist_ok=True)
        self._fds: dict[str, int] = {}
        self._by_name = {b.idstr: b for b in self.blocks}
        try:
            for b in self.blocks:
                fd = os.open(self.directory / b.file, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                self._fds[b.idstr] = fd
                os.ftruncate(fd, b.used_length)  # all holes: reads as zero, takes no space
        except OSError as exc:
            self.abort()
            raise SnapshotError(f"{self.directory}: cannot create the block files: {exc}") from None
        self._head = b""
        self._devices = bytearray()
        self._device_entries: list[SnapshotDevice] = []
        self._committed = False

    # -- RAM ---------------------------------------------------------------------

    def block(self, idstr: str) -> SnapshotBlock:
        try:
            return self._by_name[idstr]
        except KeyError:
            raise SnapshotError(f"no RAM block {idstr!r} in this snapshot (blocks: "
                                f"{', '.join(self._by_name)})") from None

    def fileno(self, idstr: str) -> int:
        """The block file's descriptor (read-write), e.g. to mmap it MAP_SHARED elsewhere."""
        self.block(idstr)
        return self._fds[idstr]

    def mmap(self, idstr: str) -> mmap.mmap:
        """A ``MAP_SHARED`` read-write mapping of the whole block file."""
        b = self.block(idstr)
        return mmap.mmap(self._fds[idstr], b.used_length, flags=mmap.MAP_SHARED,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)

    def write(self, idstr: str, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset`` of a block (skipped when all zero: the file is a hole there)."""
        b = self.block(idstr)
        if offset < 0 or offset + len(data) > b.used_length:
            raise SnapshotError(f"write {idstr!r} {offset:#x}+{len(data):#x} runs past used_length "
                                f"{b.used_length:#x}")
        if not any(data):
            return
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fds[idstr], view, offset)
            view, offset = view[n:], offset + n

    def zero(self, idstr: str, offset: int, length: int) -> None:
        """Make a range zero again by punching a hole (a discard after precopy wrote it)."""
        b = self.block(idstr)
        if offset < 0 or offset + length > b.used_length:
            raise SnapshotError(f"zero {idstr!r} {offset:#x}+{length:#x} runs past used_length "
                                f"{b.used_length:#x}")
        if _fallocate()(self._fds[idstr], _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
            err = ctypes.get_errno()
            if err != errno.EOPNOTSUPP:  # else: write zeros instead
                raise SnapshotError(f"punching {idstr!r} {offset:#x}+{length:#x}: {os.strerror(err)}")
            os.pwrite(self._fds[idstr], bytes(length), offset)

    # -- device state ---------------------------------------------------------------

    def set_stream_head(self, raw: bytes) -> None:
        """The stream header and configuration section, exactly as received."""
        if raw[:4] != b"QEVM":
            raise SnapshotError(f"stream head starts with {raw[:4].hex(' ')}, not the QEVM magic")
        self._head = bytes(raw)

    def add_device(self, section: DeviceSection, *, in_package: bool) -> None:
        """A non-RAM device section, in stream order (``in_package``: it came inside PACKAGED)."""
        raw = encode(section)
        self._device_entries.append(SnapshotDevice(
            idstr=section.idstr, section_id=section.section_id, instance_id=section.instance_id,
            version_id=section.version_id, in_package=in_package, offset=len(self._devices), length=len(raw)))
        self._devices += raw

    # -- finish -----------------------------------------------------------------------

    def commit(self) -> Snapshot:
        """Flush the blocks, write the device files and the manifest (atomically, last)."""
        if self._committed:
            raise SnapshotError(f"{self.directory}: snapshot already committed")
        if not self._head:
            raise SnapshotError(f"{self.directory}: no stream head recorded (set_stream_head)")
        for fd in self._fds.values():
            os.fsync(fd)
        _write_file(self.directory / STREAM_HEAD, self._head)
        _write_file(self.directory / DEVICES, bytes(self._devices))
        manifest = {
            "format": FORMAT,
            "target_page_size": self.target_page_size,
            "machine_type": self.machine_type,
            "blocks": [{"idstr": b.idstr, "used_length": b.used_length, "page_size": b.page_size,
                        "file": b.file} for b in self.blocks],
            "stream_head": STREAM_HEAD,
            "devices": [{"idstr": d.idstr, "section_id": d.section_id, "instance_id": d.instance_id,
                         "version_id": d.version_id, "in_package": d.in_package, "offset": d.offset,
                         "length": d.length} for d in self._device_entries],
        }
        _write_file(self.directory / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        self._close_fds()
        self._committed = True
        return Snapshot.open(self.directory)

    def abort(self) -> None:
        """Close the block files without writing a manifest (the directory stays unfinished)."""
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self.abort()


def _write_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_block(where: str, idstr: Any, used: Any, psize: Any, tps: int, seen: set[str]) -> None:
    if not isinstance(idstr, str) or not 1 <= len(idstr.encode("utf-8", "surrogateescape")) <= 255:
        raise SnapshotError(f"{where}: block idstr {idstr!r} is not a string of 1..255 bytes")
    if idstr in seen:
        raise SnapshotError(f"{where}: block {idstr!r} is listed twice")
    seen.add(idstr)
    for name, v in (("used_length", used), ("page_size", psize)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise SnapshotError(f"{where}: block {idstr!r} {name} {v!r} is not a positive integer")
    if not _is_pow2(psize) or psize < tps:
        raise SnapshotError(f"{where}: block {idstr!r} page_size {psize:#x} is not a power of two >= the "
                            f"target page size {tps:#x}")
    if used % psize:
        raise SnapshotError(f"{where}: block {idstr!r} used_length {used:#x} is not a multiple of its "
                            f"page_size {psize:#x}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Snapshot:
    """A validated snapshot directory (open with :meth:`open`)."""

    directory: Path
    target_page_size: int
    machine_type: str | None
    blocks: tuple[SnapshotBlock, ...]
    devices: tuple[SnapshotDevice, ...]

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> Snapshot:
        d = Path(directory)
        if not d.is_dir():
            raise SnapshotError(f"{d}: no such snapshot directory")
        mpath = d / MANIFEST
        if not mpath.is_file():
            raise SnapshotError(f"{d}: no {MANIFEST} (not a snapshot, or its writer did not finish)")
        try:
            m = json.loads(mpath.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SnapshotError(f"{mpath}: not readable JSON: {exc}") from None
        if not isinstance(m, dict):
            raise SnapshotError(f"{mpath}: the manifest is not a JSON object")
        fmt = m.get("format")
        if fmt != FORMAT:
            raise SnapshotError(f"{mpath}: format {fmt!r}, expected {FORMAT!r}")
        unknown = set(m) - _TOP_KEYS
        missing = _TOP_KEYS - set(m)
        if unknown or missing:
            raise SnapshotError(f"{mpath}: " + "; ".join(
                x for x in (f"unknown keys {sorted(unknown)}" if unknown else "",
                            f"missing keys {sorted(missing)}" if missing else "") if x))
        tps = m["target_page_size"]
        if not isinstance(tps, int) or isinstance(tps, bool) or not _is_pow2(tps) or tps < 1024:
            raise SnapshotError(f"{mpath}: target_page_size {tps!r} is not a power of two >= 1024")
        if m["machine_type"] is not None and not isinstance(m["machine_type"], str):
            raise SnapshotError(f"{mpath}: machine_type {m['machine_type']!r} is not a string or null")
        if not isinstance(m["blocks"], list) or not m["blocks"]:
            raise SnapshotError(f"{mpath}: blocks must be a non-empty list")
        blocks: list[SnapshotBlock] = []
        seen: set[str] = set()
        for i, b in enumerate(m["blocks"]):
            if not isinstance(b, dict) or set(b) != _BLOCK_KEYS:
                raise SnapshotError(f"{mpath}: blocks[{i}] must have exactly the keys {sorted(_BLOCK_KEYS)}, "
                                    f"got {sorted(b) if isinstance(b, dict) else type(b).__name__}")
            _check_block(f"{mpath}: blocks[{i}]", b["idstr"], b["used_length"], b["page_size"], tps, seen)
            blocks.append(SnapshotBlock(idstr=b["idstr"], used_length=b["used_length"],
                                        page_size=b["page_size"], file=_checked_file(d, b["file"], f"blocks[{i}]")))
            size = (d / b["file"]).stat().st_size
            if size != b["used_length"]:
                raise SnapshotError(f"{d / b['file']}: {size} bytes, but block {b['idstr']!r} has used_length "
                                    f"{b['used_length']} ({b['used_length']:#x})")
        head = _checked_file(d, m["stream_head"], "stream_head")
        if (d / head).read_bytes()[:4] != b"QEVM":
            raise SnapshotError(f"{d / head}: does not start with the QEVM stream header")
        devices = _checked_devices(d, m["devices"], mpath)
        return cls(directory=d, target_page_size=tps, machine_type=m["machine_type"], blocks=tuple(blocks),
                   devices=devices)

    # -- access ------------------------------------------------------------------------

    def block(self, idstr: str) -> SnapshotBlock:
        for b in self.blocks:
            if b.idstr == idstr:
                return b
        raise SnapshotError(f"no RAM block {idstr!r} in {self.directory} (blocks: "
                            f"{', '.join(b.idstr for b in self.blocks)})")

    def path(self, idstr: str) -> Path:
        return self.directory / self.block(idstr).file

    def mmap(self, idstr: str, *, writable: bool = False) -> mmap.mmap:
        """Map a block file (``MAP_SHARED``; read-only unless ``writable``)."""
        b = self.block(idstr)
        fd = os.open(self.path(idstr), (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            return mmap.mmap(fd, b.used_length, flags=mmap.MAP_SHARED, prot=prot)
        finally:
            os.close(fd)

    def stream_head(self) -> bytes:
        """Header and configuration section, exactly as received."""
        return (self.directory / STREAM_HEAD).read_bytes()

    def device_bytes(self) -> bytes:
        return (self.directory / DEVICES).read_bytes()

    def device_sections(self, *, in_package: bool | None = None) -> Iterable[DeviceSection]:
        """The device sections in stream order (only those in or outside PACKAGED when given)."""
        raw = self.device_bytes()
        for d in self.devices:
            if in_package is not None and d.in_package != in_package:
                continue
            b = raw[d.offset : d.offset + d.length]
            hdr = 1 + 4 + 1 + b[5] + 8
            yield DeviceSection(section_id=d.section_id, idstr=d.idstr, instance_id=d.instance_id,
                                version_id=d.version_id, payload=b[hdr:-5])

    def allocated_bytes(self) -> int:
        """Disk space the block files use (holes excluded)."""
        return sum((self.directory / b.file).stat().st_blocks * 512 for b in self.blocks)


def _checked_file(d: Path, rel: Any, what: str) -> str:
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
        raise SnapshotError(f"{d / MANIFEST}: {what} file {rel!r} is not a relative path inside the directory")
    p = d / rel
    if not p.exists():
        raise SnapshotError(f"{p}: missing ({what} of {d / MANIFEST})")
    if not p.is_file():
        raise SnapshotError(f"{p}: not a regular file ({what})")
    return rel


def _checked_devices(d: Path, entries: Any, mpath: Path) -> tuple[SnapshotDevice, ...]:
    if not isinstance(entries, list):
        raise SnapshotError(f"{mpath}: devices must be a list")
    raw = (d / _checked_file(d, DEVICES, "devices")).read_bytes()
    out: list[SnapshotDevice] = []
    pos = 0
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or set(e) != _DEVICE_KEYS:
            raise SnapshotError(f"{mpath}: devices[{i}] must have exactly the keys {sorted(_DEVICE_KEYS)}")
        dev = SnapshotDevice(**e)
        if dev.offset != pos or dev.length < 19 or dev.offset + dev.length > len(raw):
            raise SnapshotError(f"{mpath}: devices[{i}] ({dev.idstr!r}) at {dev.offset}+{dev.length} does not "
                                f"follow the previous section (at {pos}) inside {DEVICES} ({len(raw)} bytes)")
        b = raw[dev.offset : dev.offset + dev.length]
        footer = b"\x7e" + dev.section_id.to_bytes(4, "big")
        if b[0] != 0x04 or b[6 : 6 + b[5]] != dev.idstr.encode() or b[-5:] != footer:
            raise SnapshotError(f"{d / DEVICES}: bytes at {dev.offset} are not the FULL section {dev.idstr!r} "
                                f"(id {dev.section_id}) with its footer")
        pos += dev.length
        out.append(dev)
    if pos != len(raw):
        raise SnapshotError(f"{d / DEVICES}: {len(raw) - pos} bytes after the last listed device section")
    return tuple(out)
