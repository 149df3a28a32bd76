"""What both roles must agree on: the guest's RAM blocks and its workload.

Like QEMU, the source and the destination are started with the same memory
configuration (the RAM setup on the wire only names blocks and sizes). The
built-in guest's workload parameters and its running state travel as the one
device section of the migration, inside PACKAGED.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import asdict, dataclass, field

from uffd import PAGE_1G, PAGE_2M, PAGE_4K, GuestMemory, RamBlock

__all__ = [
    "DEVICE_IDSTR",
    "BlockSpec",
    "GuestSpec",
    "SpecError",
    "decode_device_state",
    "encode_device_state",
    "parse_size",
]

#: The device section that carries the built-in guest's state.
DEVICE_IDSTR = "postcopy-guest"
DEVICE_VERSION = 1
_DEVICE_MAGIC = b"PCGUEST1"
_PAGE_SIZES = {"4K": PAGE_4K, "2M": PAGE_2M, "1G": PAGE_1G}
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class SpecError(ValueError):
    """A guest specification that cannot work, or two that disagree."""


def parse_size(text: str) -> int:
    """``"1G"`` -> 1073741824; plain numbers are bytes."""
    m = re.fullmatch(r"(\d+)([KMGT]?)(I?B)?", text.strip().upper())
    if not m:
        raise SpecError(f"size {text!r}: expected a number with an optional K/M/G/T suffix")
    return int(m.group(1)) * _UNITS[m.group(2)]


def parse_page_size(text: str) -> int:
    try:
        return _PAGE_SIZES[text.upper()]
    except KeyError:
        raise SpecError(f"page size {text!r}: expected one of {', '.join(_PAGE_SIZES)}") from None


@dataclass(frozen=True, slots=True)
class BlockSpec:
    idstr: str
    size: int
    page_size: int = PAGE_4K

    def backing(self, prealloc: bool = False) -> str:
        """hugetlbfs for huge pages; 4 KiB pages anonymous, or a memfd a destination preallocates."""
        if self.page_size != PAGE_4K:
            return "hugetlbfs"
        return "memfd" if prealloc else "anon"


@dataclass(frozen=True, slots=True)
class GuestSpec:
    blocks: tuple[BlockSpec, ...]
    vcpus: int = 2
    pattern: str = "seq"
    seed: int = 1
    write_percent: int = 50
    rate_limit: int = 0
    extra: dict[str, object] = field(default_factory=dict, compare=False)

    @classmethod
    def simple(cls, size: int, page_size: int = PAGE_4K, **kw: object) -> GuestSpec:
        """One large guest block plus two small ones, as a PC has (several blocks of different sizes)."""
        if size < 4 * page_size or size % page_size:
            raise SpecError(f"--size {size} must be a multiple of the page size {page_size} and at least 4 pages")
        blocks = (
            BlockSpec("pc.ram", size, page_size),
            BlockSpec("pc.bios", 256 << 10),
            BlockSpec("/rom@etc/acpi/tables", 128 << 10),
        )
        return cls(blocks=blocks, **kw)  # type: ignore[arg-type]

    def build_memory(self, prealloc: bool = False) -> GuestMemory:
        """The guest's blocks; ``prealloc``: 4 KiB blocks are memfds (see BuiltinGuest)."""
        blocks: list[RamBlock] = []
        try:
            blocks.extend(RamBlock(b.idstr, b.size, b.page_size, b.backing(prealloc))  # type: ignore[arg-type]
                          for b in self.blocks)
        except Exception:
            for blk in blocks:
                blk.close()
            raise
        return GuestMemory(blocks)

    def workload(self) -> dict[str, object]:
        return {"vcpus": self.vcpus, "pattern": self.pattern, "seed": self.seed,
                "write_percent": self.write_percent, "rate_limit": self.rate_limit}

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d.pop("extra")
        return d


def encode_device_state(spec: GuestSpec, state: bytes, stopped_ns: int) -> bytes:
    """Our device section payload: magic, the workload, the guest's saved state."""
    meta = json.dumps({"workload": spec.workload(), "stopped_ns": stopped_ns}).encode()
    return _DEVICE_MAGIC + struct.pack(">I", len(meta)) + meta + struct.pack(">I", len(state)) + state


def decode_device_state(payload: bytes, spec: GuestSpec) -> tuple[bytes, int]:
    """The guest state and the source's stop time; checks the workload matches ours."""
    if payload[:8] != _DEVICE_MAGIC or len(payload) < 16:
        raise SpecError(f"device section {DEVICE_IDSTR!r}: not a postcopy guest state (bad magic)")
    (n,) = struct.unpack_from(">I", payload, 8)
    meta_end = 12 + n
    if meta_end + 4 > len(payload):
        raise SpecError(f"device section {DEVICE_IDSTR!r}: truncated")
    meta = json.loads(payload[12:meta_end])
    (m,) = struct.unpack_from(">I", payload, meta_end)
    state = payload[meta_end + 4 : meta_end + 4 + m]
    if len(state) != m:
        raise SpecError(f"device section {DEVICE_IDSTR!r}: truncated guest state")
    if meta.get("workload") != spec.workload():
        raise SpecError(f"the source's guest workload {meta.get('workload')} differs from ours {spec.workload()}")
    return state, int(meta.get("stopped_ns", 0))
