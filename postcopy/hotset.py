"""Hot sets: the pages a guest needed first after a switch, recorded by one migration
and pushed first by a later migration of the same guest (docs/design.md "Prefetch").

A hot set is a hint, never a correctness matter: whatever it names is sent once,
like every page, only earlier. So a file that cannot be read at all (not a hot set,
another version, truncated, a bad checksum) is an error the operator hears about
before anything is migrated, while a well-formed hot set of another guest (a block
this guest does not have, another page size, pages past a block's end) is used for
what still fits and the rest is left out with a warning.

File format, version 1 (all integers big-endian, as in the migration stream)::

    magic      8 bytes   b"PCHOTSET"
    version    u16       1
    flags      u16       0 (a reader refuses bits it does not know)
    nblocks    u32
    nruns      u64
    nblocks times:  idlen u8 (1..255), idstr (UTF-8), used_length u64, host_page_size u64
    nruns times:    block u32 (index into the table above), npages u32, first u64
    crc32      u32       zlib.crc32 of every byte before it

Runs are in 4 KiB target pages, whole host pages of their block, in the order of
their first request (the order to push them in); a run never names a page twice
and no page is in two runs. 16 bytes a run: a 1 GiB guest whose 100 MiB hot set
is scattered page by page takes 400 KiB; a walked region takes one run.
"""

from __future__ import annotations

import os
import struct
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["MAGIC", "VERSION", "HotBlock", "HotSet", "HotSetError", "Resolved"]

MAGIC = b"PCHOTSET"
VERSION = 1
TARGET_PAGE_SIZE = 4096
_HEADER = struct.Struct(">8sHHIQ")
_BLOCK_TAIL = struct.Struct(">QQ")
_RUN = struct.Struct(">IIQ")
_CRC = struct.Struct(">I")
#: more runs than this is not a hot set (a 16 TiB guest's worth of single pages)
MAX_RUNS = 1 << 32


class HotSetError(ValueError):
    """A file that is not a usable hot set (the message says why)."""


@dataclass(frozen=True, slots=True)
class HotBlock:
    """A RAM block as the recording migration saw it."""

    idstr: str
    used_length: int
    host_page_size: int


@dataclass(frozen=True, slots=True)
class Resolved:
    """A hot set matched against a migration's blocks: flat (block index, first, npages)
    triples in target pages and in push order, and what was left out."""

    runs: array[int]
    pages: int
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HotSet:
    """Blocks and runs of target pages (flat triples: block index into ``blocks``, first, npages)."""

    blocks: tuple[HotBlock, ...]
    runs: array[int] = field(default_factory=lambda: array("Q"))

    def __post_init__(self) -> None:
        if len(self.runs) % 3:
            raise HotSetError("runs must be (block, first, npages) triples")

    @property
    def nruns(self) -> int:
        return len(self.runs) // 3

    @property
    def pages(self) -> int:
        return sum(self.runs[2::3])

    # -- the file ---------------------------------------------------------------------

    def encode(self) -> bytes:
        if len(self.blocks) >= 1 << 32 or self.nruns >= MAX_RUNS:
            raise HotSetError("too many blocks or runs for a hot set")
        out = bytearray(_HEADER.pack(MAGIC, VERSION, 0, len(self.blocks), self.nruns))
        for b in self.blocks:
            name = b.idstr.encode()
            if not 1 <= len(name) <= 255:
                raise HotSetError(f"block idstr {b.idstr!r}: 1 to 255 bytes")
            out += bytes([len(name)]) + name + _BLOCK_TAIL.pack(b.used_length, b.host_page_size)
        r = self.runs
        for i in range(0, len(r), 3):
            if r[i] >= len(self.blocks) or not 0 < r[i + 2] < 1 << 32:
                raise HotSetError(f"run {i // 3}: block {r[i]} or {r[i + 2]} pages out of range")
            out += _RUN.pack(r[i], r[i + 2], r[i + 1])
        out += _CRC.pack(zlib.crc32(out))
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes) -> HotSet:
        """Parse a hot set file; :class:`HotSetError` says what is wrong with it."""
        if len(data) < _HEADER.size + _CRC.size:
            raise HotSetError(f"{len(data)} bytes: too short for a hot set")
        magic, version, flags, nblocks, nruns = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise HotSetError(f"not a hot set (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise HotSetError(f"hot set version {version}: this postcopy reads version {VERSION}")
        if flags:
            raise HotSetError(f"hot set flags 0x{flags:04x}: unknown to this version")
        (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
        if zlib.crc32(data[:-_CRC.size]) != crc:
            raise HotSetError("hot set checksum mismatch: the file is damaged or truncated")
        off = _HEADER.size
        blocks = []
        for i in range(nblocks):
            if off >= len(data) - _CRC.size:
                raise HotSetError(f"block table ends after {i} of {nblocks} blocks")
            n = data[off]
            name = data[off + 1:off + 1 + n]
            if n == 0 or off + 1 + n + _BLOCK_TAIL.size > len(data) - _CRC.size:
                raise HotSetError(f"block {i}: bad idstr length {n}")
            length, page_size = _BLOCK_TAIL.unpack_from(data, off + 1 + n)
            try:
                idstr = name.decode()
            except UnicodeDecodeError:
                raise HotSetError(f"block {i}: idstr {name!r} is not UTF-8") from None
            if page_size < TARGET_PAGE_SIZE or page_size & (page_size - 1) or length % page_size:
                raise HotSetError(f"block {idstr}: host page size {page_size} / length {length} inconsistent")
            blocks.append(HotBlock(idstr, length, page_size))
            off += 1 + n + _BLOCK_TAIL.size
        if len(data) - _CRC.size - off != nruns * _RUN.size:
            raise HotSetError(f"{nruns} runs need {nruns * _RUN.size} bytes, the file has "
                              f"{len(data) - _CRC.size - off}")
        runs = array("Q")
        for block, npages, first in _RUN.iter_unpack(data[off:len(data) - _CRC.size]):
            if block >= nblocks or npages == 0:
                raise HotSetError(f"run {len(runs) // 3}: block {block} of {nblocks}, {npages} pages")
            runs.extend((block, first, npages))
        return cls(tuple(blocks), runs)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HotSet:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise HotSetError(f"{path}: {exc.strerror or exc}") from None
        try:
            return cls.decode(data)
        except HotSetError as exc:
            raise HotSetError(f"{path}: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (a reader never sees half a file)."""
        target = Path(path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(self.encode())
        os.replace(tmp, target)

    # -- against a migration's blocks ---------------------------------------------------

    def resolve(self, blocks: Sequence[HotBlock]) -> Resolved:
        """The runs this migration can push: block indices into ``blocks`` (matched by idstr),
        runs of a block that is missing or has another page size left out, runs past a
        block's end cut there; a warning for each kind of loss."""
        index = {b.idstr: i for i, b in enumerate(blocks)}
        target: list[int | None] = []
        warnings: list[str] = []
        for b in self.blocks:
            i = index.get(b.idstr)
            if i is None:
                warnings.append(f"hot set block {b.idstr!r} is not in this migration: its pages are left out")
            elif blocks[i].host_page_size != b.host_page_size:
                warnings.append(f"hot set block {b.idstr!r} had {b.host_page_size}-byte pages, this one has "
                                f"{blocks[i].host_page_size}: its pages are left out")
                i = None
            target.append(i)
        out = array("Q")
        pages = clipped = 0
        r = self.runs
        for k in range(0, len(r), 3):
            i = target[r[k]]
            if i is None:
                continue
            limit = blocks[i].used_length // TARGET_PAGE_SIZE
            first, n = r[k + 1], r[k + 2]
            if first + n > limit:
                clipped += first + n - max(first, limit)
                n = max(0, limit - first)
            if n:
                out.extend((i, first, n))
                pages += n
        if clipped:
            warnings.append(f"{clipped} hot set pages lie past the end of their block: left out")
        if self.runs and not pages:
            warnings.append("no page of the hot set fits this migration's blocks: nothing is pushed first")
        return Resolved(out, pages, tuple(warnings))
