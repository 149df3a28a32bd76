"""Events of the wire codec: frozen, slotted, keyword-only, validated on construction.

Decoding yields these; ``encode()`` turns each back into its exact bytes.
Offsets and lengths are bytes (never pages); idstrs are RAMBlock / device names.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, TypeAlias

from ._errors import LocalProtocolError

__all__ = [
    "RAM_RECORD",
    "Configuration",
    "ConnectionClosed",
    "DeviceSection",
    "EnableColo",
    "EndOfStream",
    "OpenReturnPath",
    "Packaged",
    "PageRequest",
    "Ping",
    "Pong",
    "PostcopyAdvise",
    "PostcopyListen",
    "PostcopyRamDiscard",
    "PostcopyResume",
    "PostcopyRun",
    "RamBlockEntry",
    "RamBlockLayout",
    "RamEos",
    "RamLayout",
    "RamPages",
    "RamRecord",
    "RamSetup",
    "RecvBitmap",
    "RecvBitmapRequest",
    "ResumeAck",
    "SectionEnd",
    "SectionFooter",
    "SectionPart",
    "SectionStart",
    "Shut",
    "StreamHeader",
    "SwitchoverAck",
    "SwitchoverStart",
    "VmDescription",
    "WireEvent",
]

#: Layout of one entry of ``RamPages.records`` (C ``pc_ram_record``, native order):
#: u64 offset, u64 data_pos, u32 block, u8 kind (1 ZERO, 2 PAGE), u8 had_idstr, u8 fill, u8 pad.
RAM_RECORD = struct.Struct("=QQIBBBB")
REC_ZERO = 1
REC_PAGE = 2


def _bad(what: str) -> LocalProtocolError:
    return LocalProtocolError(what, kind="bad_value")


def _uint(name: str, value: int, bits: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
        raise _bad(f"{name}={value!r} is not an unsigned {bits}-bit integer")


def _idstr(name: str, value: str) -> None:
    if not isinstance(value, str):
        raise _bad(f"{name}={value!r} is not a str")
    n = len(value.encode("utf-8", "surrogateescape"))
    if not 1 <= n <= 255:
        raise LocalProtocolError(
            f"{name}={value!r} is {n} bytes long; a counted string holds 1..255",
            kind="empty_idstr" if n == 0 else "bad_value",
        )


def _page_size(name: str, value: int) -> None:
    _uint(name, value, 64)
    if value < 1024 or value & (value - 1):
        raise _bad(f"{name}={value:#x} is not a power of two >= 1 KiB")


# ---------------------------------------------------------------- main channel


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamHeader:
    """``QEVM`` magic and version (3) at the start of a fresh main stream."""

    version: int = 3

    def __post_init__(self) -> None:
        _uint("version", self.version, 32)


@dataclass(frozen=True, slots=True, kw_only=True)
class Configuration:
    """The configuration section (0x07) after the header.

    Optional subsections are sent in this fixed order when present.
    """

    machine_type: str
    target_page_bits: int | None = None
    capabilities: tuple[str, ...] | None = None
    uuid: bytes | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.machine_type, str):
            raise _bad(f"machine_type={self.machine_type!r} is not a str")
        if self.target_page_bits is not None:
            _uint("target_page_bits", self.target_page_bits, 32)
        if self.capabilities is not None:
            object.__setattr__(self, "capabilities", tuple(self.capabilities))
            for cap in self.capabilities:
                _idstr("capability", cap)
        if self.uuid is not None and (not isinstance(self.uuid, bytes) or len(self.uuid) != 16):
            raise _bad(f"uuid={self.uuid!r} is not 16 bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class OpenReturnPath:
    """MIG_CMD_OPEN_RETURN_PATH: the destination opens its RP writer."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    """MIG_CMD_PING: the destination answers with a Pong of the same value."""

    value: int

    def __post_init__(self) -> None:
        _uint("value", self.value, 32)


@dataclass(frozen=True, slots=True, kw_only=True)
class PostcopyAdvise:
    """MIG_CMD_POSTCOPY_ADVISE: len 16 with postcopy-ram, len 0 (both None) for dirty bitmaps only."""

    pagesize_summary: int | None
    target_page_size: int | None

    def __post_init__(self) -> None:
        if (self.pagesize_summary is None) != (self.target_page_size is None):
            raise _bad("pagesize_summary and target_page_size are both set or both None")
        if self.pagesize_summary is not None:
            _uint("pagesize_summary", self.pagesize_summary, 64)
            _uint("target_page_size", self.target_page_size, 64)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True, kw_only=True)
class PostcopyListen:
    """MIG_CMD_POSTCOPY_LISTEN."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PostcopyRun:
    """MIG_CMD_POSTCOPY_RUN."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PostcopyResume:
    """MIG_CMD_POSTCOPY_RESUME (recovery handshake)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EnableColo:
    """MIG_CMD_ENABLE_COLO (x-colo only)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SwitchoverStart:
    """MIG_CMD_SWITCHOVER_START (10.0+; unknown to 7.2)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PostcopyRamDiscard:
    """MIG_CMD_POSTCOPY_RAM_DISCARD: byte ranges ``(start, length)`` of one block to drop."""

    idstr: str
    ranges: tuple[tuple[int, int], ...]
    version: int = 0

    def __post_init__(self) -> None:
        _idstr("idstr", self.idstr)
        ranges = tuple((int(s), int(n)) for s, n in self.ranges)
        object.__setattr__(self, "ranges", ranges)
        if not ranges:
            raise _bad("a discard command holds at least one range")
        for s, n in ranges:
            _uint("start", s, 64)
            _uint("length", n, 64)
        if self.version != 0:
            raise _bad(f"discard version={self.version} (only 0 exists)")


@dataclass(frozen=True, slots=True, kw_only=True)
class RecvBitmapRequest:
    """MIG_CMD_RECV_BITMAP: the source asks for the received bitmap of one block."""

    idstr: str

    def __post_init__(self) -> None:
        _idstr("idstr", self.idstr)


@dataclass(frozen=True, slots=True, kw_only=True)
class SectionStart:
    """SECTION_START header of an iterable section (only ``ram`` is decoded)."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int

    def __post_init__(self) -> None:
        _uint("section_id", self.section_id, 32)
        _idstr("idstr", self.idstr)
        _uint("instance_id", self.instance_id, 32)
        _uint("version_id", self.version_id, 32)


@dataclass(frozen=True, slots=True, kw_only=True)
class SectionPart:
    """SECTION_PART header (short: type and section id)."""

    section_id: int

    def __post_init__(self) -> None:
        _uint("section_id", self.section_id, 32)


@dataclass(frozen=True, slots=True, kw_only=True)
class SectionEnd:
    """SECTION_END header (short: type and section id)."""

    section_id: int

    def __post_init__(self) -> None:
        _uint("section_id", self.section_id, 32)


@dataclass(frozen=True, slots=True, kw_only=True)
class SectionFooter:
    """0x7e + section id after a START/PART/END payload."""

    section_id: int

    def __post_init__(self) -> None:
        _uint("section_id", self.section_id, 32)


@dataclass(frozen=True, slots=True, kw_only=True)
class RamBlockEntry:
    """One block of the RAM setup list; ``page_size`` only when it was on the wire."""

    idstr: str
    used_length: int
    page_size: int | None = None

    def __post_init__(self) -> None:
        _idstr("idstr", self.idstr)
        _uint("used_length", self.used_length, 64)
        if self.page_size is not None:
            _uint("page_size", self.page_size, 64)


@dataclass(frozen=True, slots=True, kw_only=True)
class RamSetup:
    """The ``ram`` START payload before its EOS: MEM_SIZE total and the block list."""

    total_bytes: int
    blocks: tuple[RamBlockEntry, ...]

    def __post_init__(self) -> None:
        _uint("total_bytes", self.total_bytes, 64)
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if sum(b.used_length for b in self.blocks) != self.total_bytes:
            raise LocalProtocolError(
                f"block sizes add up to {sum(b.used_length for b in self.blocks):#x}, "
                f"not the MEM_SIZE total {self.total_bytes:#x}",
                kind="mem_size",
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class RamEos:
    """RAM_SAVE_FLAG_EOS: end of a RAM chunk (or of the preempt stream)."""


class RamRecord(NamedTuple):
    """One page record, unpacked (slow path: tests, inspect details)."""

    offset: int
    data_pos: int
    block: int
    kind: int
    had_idstr: bool
    fill: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RamPages:
    """A run of page records, as ONE event: no Python object per page.

    ``records`` packs :data:`RAM_RECORD` entries (the C ``pc_ram_record``);
    each names ``blocks[block]``, a byte offset, ZERO or PAGE, whether the
    record carried its idstr, and for PAGE where its ``target_page_size``
    bytes of data sit in ``buffer``.  ``channel`` is 0 (main) or 1 (preempt).
    """

    channel: int
    blocks: tuple[str, ...]
    records: bytes
    buffer: bytes | memoryview = field(repr=False)
    target_page_size: int = 4096

    def __post_init__(self) -> None:
        if self.channel not in (0, 1):
            raise _bad(f"channel={self.channel!r} is not 0 (main) or 1 (preempt)")
        object.__setattr__(self, "blocks", tuple(self.blocks))
        for b in self.blocks:
            _idstr("block idstr", b)
        if not isinstance(self.records, bytes) or len(self.records) % RAM_RECORD.size:
            raise _bad(f"records must be bytes of {RAM_RECORD.size}-byte entries")
        if not isinstance(self.buffer, (bytes, memoryview)):
            raise _bad("buffer must be bytes or a memoryview")
        _page_size("target_page_size", self.target_page_size)

    def __len__(self) -> int:
        return len(self.records) // RAM_RECORD.size

    def record(self, index: int) -> RamRecord:
        off, pos, blk, kind, had, fill, _ = RAM_RECORD.unpack_from(self.records, index * RAM_RECORD.size)
        return RamRecord(off, pos, blk, kind, bool(had), fill)

    def iter_records(self) -> Iterator[RamRecord]:
        """Per-record view for tests and diagnostics; bulk code uses ``records`` in C."""
        for i in range(len(self)):
            yield self.record(i)

    def page_data(self, index: int) -> memoryview:
        rec = self.record(index)
        if rec.kind != REC_PAGE:
            raise _bad(f"record {index} is a ZERO record: it carries no data")
        return memoryview(self.buffer)[rec.data_pos : rec.data_pos + self.target_page_size]


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceSection:
    """A FULL section of a device the codec does not interpret: payload kept opaque.

    The payload is delimited by its footer (0x7e + section id followed by a
    plausible next item); inside PACKAGED it is bounded by the blob length.
    """

    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    payload: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _uint("section_id", self.section_id, 32)
        _idstr("idstr", self.idstr)
        _uint("instance_id", self.instance_id, 32)
        _uint("version_id", self.version_id, 32)
        if not isinstance(self.payload, bytes):
            raise _bad("payload must be bytes")


@dataclass(frozen=True, slots=True, kw_only=True)
class EndOfStream:
    """QEMU_VM_EOF (0x00): the sender's last item (or the end of a package)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class VmDescription:
    """QEMU_VM_VMDESCRIPTION after a precopy EOF: JSON kept as bytes."""

    json: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.json, bytes) or len(self.json) >= 1 << 32:
            raise _bad("json must be bytes shorter than 4 GiB")


@dataclass(frozen=True, slots=True, kw_only=True)
class Packaged:
    """MIG_CMD_PACKAGED and its nested stream, decoded (LISTEN, device sections, PINGs, RUN)."""

    events: tuple[WireEvent, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "events", tuple(self.events))
        for ev in self.events:
            if isinstance(ev, (Packaged, RamPages, RamSetup, RamEos, StreamHeader, Configuration,
                               ConnectionClosed)):
                raise LocalProtocolError(
                    f"{type(ev).__name__} cannot sit inside a PACKAGED blob", kind="nested_packaged"
                    if isinstance(ev, Packaged) else "bad_value"
                )


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionClosed:
    """The transport reached EOF at an item boundary.

    ``complete`` is False for a main stream cut before its EOF item.
    """

    complete: bool = True


# ---------------------------------------------------------------- return path


@dataclass(frozen=True, slots=True, kw_only=True)
class Shut:
    """RP SHUT: 0 = ok, non-zero = destination error."""

    value: int = 0

    def __post_init__(self) -> None:
        _uint("value", self.value, 32)


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong:
    """RP PONG: echoes a PING value."""

    value: int

    def __post_init__(self) -> None:
        _uint("value", self.value, 32)


@dataclass(frozen=True, slots=True, kw_only=True)
class PageRequest:
    """RP REQ_PAGES_ID (``idstr`` set) or REQ_PAGES (``idstr`` None: same block as before)."""

    start: int
    length: int
    idstr: str | None = None

    def __post_init__(self) -> None:
        _uint("start", self.start, 64)
        _uint("length", self.length, 32)
        if self.idstr is not None:
            _idstr("idstr", self.idstr)


@dataclass(frozen=True, slots=True, kw_only=True)
class RecvBitmap:
    """RP RECV_BITMAP + its out-of-frame body (be64 size, LE bitmap, end mark)."""

    idstr: str
    bitmap: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _idstr("idstr", self.idstr)
        if not isinstance(self.bitmap, bytes):
            raise _bad("bitmap must be bytes")

    def received_pages(self) -> int:
        return int.from_bytes(self.bitmap, "little").bit_count()


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumeAck:
    """RP RESUME_ACK (QEMU sends 1)."""

    value: int = 1

    def __post_init__(self) -> None:
        _uint("value", self.value, 32)


@dataclass(frozen=True, slots=True, kw_only=True)
class SwitchoverAck:
    """RP SWITCHOVER_ACK (8.1+)."""


# ---------------------------------------------------------------- local knowledge


@dataclass(frozen=True, slots=True, kw_only=True)
class RamBlockLayout:
    """A RAM block as both ends know it: name, size and host page size."""

    idstr: str
    used_length: int
    host_page_size: int = 4096

    def __post_init__(self) -> None:
        _idstr("idstr", self.idstr)
        _uint("used_length", self.used_length, 64)
        _page_size("host_page_size", self.host_page_size)


@dataclass(frozen=True, slots=True, kw_only=True)
class RamLayout:
    """The RAM blocks of a migration (from the setup) and the ``ram`` section id.

    A recovery main stream and the preempt channel carry no setup: hand them
    the layout learnt from the original main stream.
    """

    blocks: tuple[RamBlockLayout, ...]
    section_id: int | None = None
    target_page_size: int = 4096

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))
        names = [b.idstr for b in self.blocks]
        if len(set(names)) != len(names):
            raise _bad(f"duplicate block idstr in {names}")
        _page_size("target_page_size", self.target_page_size)
        if self.section_id is not None:
            _uint("section_id", self.section_id, 32)

    def index(self, idstr: str) -> int | None:
        for i, b in enumerate(self.blocks):
            if b.idstr == idstr:
                return i
        return None

    def block(self, idstr: str) -> RamBlockLayout | None:
        i = self.index(idstr)
        return None if i is None else self.blocks[i]


WireEvent: TypeAlias = (
    StreamHeader | Configuration | OpenReturnPath | Ping | PostcopyAdvise | PostcopyListen
    | PostcopyRun | PostcopyResume | EnableColo | SwitchoverStart | PostcopyRamDiscard
    | RecvBitmapRequest | SectionStart | SectionPart | SectionEnd | SectionFooter | RamSetup | RamEos
    | RamPages | DeviceSection | EndOfStream | VmDescription | Packaged | ConnectionClosed
    | Shut | Pong | PageRequest | RecvBitmap | ResumeAck | SwitchoverAck
)
