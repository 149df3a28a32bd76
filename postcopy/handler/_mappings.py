"""Firecracker's userfaultfd handshake, sans-IO: the one message a VMM sends.

The VMM connects to the handler's Unix socket and sends a JSON array of
``GuestRegionUffdMapping`` objects (Firecracker ``src/vmm/src/persist.rs``)::

    [{"base_host_virt_addr": 140000000000000, "size": 134217728, "offset": 0,
      "page_size": 4096, "page_size_kib": 4096}, ...]

with its userfaultfd attached as SCM_RIGHTS, then keeps the connection open.
``page_size_kib`` is deprecated and, despite its name, carries bytes; senders
older than either field send neither, meaning 4 KiB pages. Unknown fields are
ignored (newer senders add some). This module only validates the message:
the socket work is the supervisor's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, Literal
import itertools

__all__ = [
    "MAX_HANDSHAKE_BYTES",
    "MAX_REGIONS",
    "HandshakeError",
    "HandshakeErrorKind",
    "Region",
    "parse_handshake",
]

# Firecracker's own handler reads the message into a 1 KiB buffer; a VMM with
# many regions needs more, and this bounds what one peer can make us hold.
MAX_HANDSHAKE_BYTES: Final = 64 * 1024
MAX_REGIONS: Final = 1024
DEFAULT_PAGE_SIZE: Final = 4096

HandshakeErrorKind = Literal["no_fd", "extra_fds", "not_uffd", "bad_json", "bad_regions", "extra_message", "closed"]


class HandshakeError(Exception):
    """The peer's handshake is unusable; ``kind`` is a closed label for metrics."""

    def __init__(self, kind: HandshakeErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: HandshakeErrorKind = kind


@dataclass(frozen=True, slots=True, kw_only=True)
class Region:
    """One GuestRegionUffdMapping: VMM memory [base, base+size) holds file bytes [offset, offset+size)."""

    base_host_virt_addr: int
    size: int
    offset: int
    page_size: int

    @property
    def end(self) -> int:
        return self.base_host_virt_addr + self.size

    @property
    def npages(self) -> int:
        return self.size // self.page_size

    def as_json(self) -> dict[str, int]:
        return {"base_host_virt_addr": self.base_host_virt_addr, "size": self.size, "offset": self.offset,
                "page_size": self.page_size}


def _uint(obj: dict[str, Any], key: str, index: int) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 1 << 64:
        raise HandshakeError("bad_regions", f"region {index}: {key} must be an unsigned 64-bit integer, got {value!r}")
    return value


def _region(obj: Any, index: int, file_size: int) -> Region:
    if not isinstance(obj, dict):
        raise HandshakeError("bad_json", f"region {index}: expected a JSON object, got {type(obj).__name__}")
    for key in ("base_host_virt_addr", "size", "offset"):
        if key not in obj:
            raise HandshakeError("bad_regions", f"region {index}: missing {key}")
    base, size, offset = (_uint(obj, k, index) for k in ("base_host_virt_addr", "size", "offset"))
    sizes = {k: _uint(obj, k, index) for k in ("page_size", "page_size_kib") if k in obj}
    if len(set(sizes.values())) > 1:
        raise HandshakeError("bad_regions", f"region {index}: page_size {sizes['page_size']} and page_size_kib "
                                            f"{sizes['page_size_kib']} differ (both are bytes)")
    page_size = next(iter(sizes.values()), DEFAULT_PAGE_SIZE)
    if page_size < 4096 or page_size & (page_size - 1):
        raise HandshakeError("bad_regions", f"region {index}: page size {page_size} is not a power of two >= 4096")
    if size == 0:
        raise HandshakeError("bad_regions", f"region {index}: size is 0")
    for name, value in (("base_host_virt_addr", base), ("size", size), ("offset", offset)):
        if value % page_size:
            raise HandshakeError("bad_regions", f"region {index}: {name} {value:#x} is not a multiple of the page size {page_size}")
    if base + size > 1 << 64:
        raise HandshakeError("bad_regions", f"region {index}: {base:#x} + {size:#x} wraps the address space")
    if offset + size > file_size:
        raise HandshakeError("bad_regions", f"region {index}: file bytes [{offset:#x}, {offset + size:#x}) lie outside "
                                            f"the memory file ({file_size:#x} bytes)")
    return Region(base_host_virt_addr=base, size=size, offset=offset, page_size=page_size)


def parse_handshake(data: bytes, nfds: int, file_size: int) -> tuple[Region, ...]:
    """Validate one handshake message carrying ``nfds`` descriptors; regions sorted by address.

    Raises HandshakeError (and nothing else) for any input.
    """
    if nfds == 0:
        raise HandshakeError("no_fd", "the handshake message carried no file descriptor (expected the userfaultfd as SCM_RIGHTS)")
    if nfds > 1:
        raise HandshakeError("extra_fds", f"the handshake message carried {nfds} file descriptors; only the userfaultfd "
                                          "is supported (guest_memfd mode is not)")
    if len(data) > MAX_HANDSHAKE_BYTES:
        raise HandshakeError("bad_json", f"handshake message of {len(data)} bytes exceeds {MAX_HANDSHAKE_BYTES}")
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise HandshakeError("bad_json", f"handshake message is not valid JSON: {exc}") from None
    if not isinstance(value, list):
        raise HandshakeError("bad_json", f"handshake message must be a JSON array of regions, got {type(value).__name__}")
    if not value:
        raise HandshakeError("bad_regions", "handshake message lists no regions")
    if len(value) > MAX_REGIONS:
        raise HandshakeError("bad_regions", f"{len(value)} regions exceed the limit of {MAX_REGIONS}")
    regions = sorted((_region(obj, i, file_size) for i, obj in enumerate(value)), key=lambda r: r.base_host_virt_addr)
    for a, b in itertools.pairwise(regions):
        if b.base_host_virt_addr < a.end:
            raise HandshakeError("bad_regions", f"regions overlap in memory: [{a.base_host_virt_addr:#x}, {a.end:#x}) and "
                                                f"[{b.base_host_virt_addr:#x}, {b.end:#x})")
    by_offset = sorted(regions, key=lambda r: r.offset)
    for a, b in itertools.pairwise(by_offset):
        if b.offset < a.offset + a.size:
            raise HandshakeError("bad_regions", f"regions overlap in the memory file: [{a.offset:#x}, {a.offset + a.size:#x}) "
                                                f"and [{b.offset:#x}, {b.offset + b.size:#x})")
    return tuple(regions)
