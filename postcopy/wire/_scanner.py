"""The seam between the codec and whoever scans, counts and builds page records in bulk.

A :class:`RecordScanner` does the three bulk jobs on RAM page records: scan a
buffer into packed records (through a per-channel :class:`ChannelScanner`),
count them per block, and build their wire form.  Two exist: the C one in
``uffd._native`` (``c_scanner()``: every call releases the GIL, no per-page
Python) and the pure-Python reference (``PYTHON_SCANNER``, same results, slow).
Decoders and ``encode`` take ``scanner=``; by default they use
:func:`default_scanner`, which is the C one when ``uffd._native`` is importable
and the Python one otherwise.  Nothing here imports the compiled core at import
time: ``import postcopy.wire`` stays free of it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from typing import Protocol, TypeAlias

from ._errors import LocalProtocolError

__all__ = [
    "MAX_BATCH",
    "SCAN_EOS",
    "SCAN_ERRORS",
    "SCAN_FULL",
    "SCAN_NEED_DATA",
    "BlockSpec",
    "BytesLike",
    "ChannelScanner",
    "RecordScanner",
    "c_scanner",
    "default_scanner",
    "encode_error",
]

BytesLike: TypeAlias = bytes | bytearray | memoryview
#: One block as the scanner sees it: (idstr bytes, used_length, host page size).
BlockSpec: TypeAlias = tuple[bytes, int, int]

#: Records per scan call (so per RamPages event): large enough that per-event Python is noise.
MAX_BATCH = 16384

# Scan statuses and error codes (the C core's PC_SCAN_*; a test checks they agree).
SCAN_NEED_DATA = 0
SCAN_EOS = 1
SCAN_FULL = 2
SCAN_E_UNKNOWN_BLOCK = -1
SCAN_E_NO_BLOCK = -2
SCAN_E_OFFSET = -3
SCAN_E_FLAGS = -4
SCAN_E_MEM_SIZE = -5
SCAN_E_XBZRLE = -6
SCAN_E_COMPRESS = -7
SCAN_E_HOOK = -8
SCAN_E_MULTIFD_FLUSH = -9
SCAN_E_ZERO_FILL = -10
SCAN_E_EOS_OFFSET = -11
SCAN_E_EMPTY_IDSTR = -12
SCAN_E_HOST_PAGE = -13
SCAN_E_ARGS = -14

#: Scanner error code -> (kind, description).
SCAN_ERRORS: dict[int, tuple[str, str]] = {
    SCAN_E_UNKNOWN_BLOCK: ("unknown_block", "page record names an unknown RAM block"),
    SCAN_E_NO_BLOCK: (
        "no_previous_block",
        "CONTINUE page record with no block named before on this channel",
    ),
    SCAN_E_OFFSET: ("offset_out_of_block", "page offset is outside its block"),
    SCAN_E_FLAGS: (
        "bad_flags",
        "record flags are not exactly one of ZERO/PAGE (+CONTINUE) or EOS "
        "(the low bits of the offset word are flags, so an unaligned offset shows up here)",
    ),
    SCAN_E_MEM_SIZE: ("mem_size", "MEM_SIZE record outside the RAM setup"),
    SCAN_E_XBZRLE: (
        "xbzrle",
        "XBZRLE page record: only precopy with the xbzrle capability sends it, "
        "and this codec does not decode it",
    ),
    SCAN_E_COMPRESS: (
        "compressed_page",
        "COMPRESS_PAGE record (old compress capability) is not supported",
    ),
    SCAN_E_HOOK: ("ram_hook", "RAM_SAVE_FLAG_HOOK record (RDMA only) is not supported"),
    SCAN_E_MULTIFD_FLUSH: ("multifd_flush", "MULTIFD_FLUSH record (multifd only) is not supported"),
    SCAN_E_ZERO_FILL: ("bad_value", "ZERO page record with a non-zero fill byte"),
    SCAN_E_EOS_OFFSET: ("eos_offset", "EOS record with non-zero offset bits"),
    SCAN_E_EMPTY_IDSTR: ("empty_idstr", "page record with an empty block idstr"),
    SCAN_E_HOST_PAGE: (
        "host_page_split",
        "postcopy page record starts another host page before the current one is complete",
    ),
    SCAN_E_ARGS: ("target_page_size", "target page size is not a power of two >= 1 KiB"),
}

# Encoder error codes (the C core's PC_ENC_E_*).
ENC_E_BLOCK = -1
ENC_E_DATA_POS = -2
ENC_E_KIND = -3
ENC_E_SPACE = -4
ENC_E_CONTINUE = -5
ENC_E_IDSTR = -6

_ENCODE_ERRORS = {
    ENC_E_BLOCK: "names a block index outside blocks",
    ENC_E_DATA_POS: "points its page data outside buffer",
    ENC_E_KIND: "has a kind that is neither ZERO nor PAGE",
    ENC_E_SPACE: "does not fit the output",
    ENC_E_CONTINUE: "is a CONTINUE record for a block other than the previous record's",
    ENC_E_IDSTR: "names a block whose idstr is not 1..255 bytes",
}


def encode_error(code: int, index: int) -> LocalProtocolError:
    """The error for encoder code ``code`` at record ``index``."""
    return LocalProtocolError(
        f"RamPages record {index} {_ENCODE_ERRORS.get(code, f'failed with code {code}')}",
        kind="bad_value",
    )


class ChannelScanner(Protocol):
    """Scan state of one channel over one layout (``last_block`` survives section ends)."""

    postcopy: bool
    """Postcopy rules: whole host pages, back to back (switched on at LISTEN)."""

    @property
    def last_block(self) -> int:
        """Index of the block the last record named; -1 before any."""
        ...

    def state_tuple(self) -> tuple[int, int, int, int]:
        """(last_block, host-page block, host-page base, target pages of it seen)."""
        ...

    def scan(self, buf: BytesLike, max_out: int = MAX_BATCH) -> tuple[int, int, bytes, int]:
        """Scan ``buf`` from its start: (consumed, status, packed records, error position).

        ``status`` is SCAN_NEED_DATA, SCAN_EOS (consumed includes the EOS word),
        SCAN_FULL (``max_out`` records) or a negative SCAN_E_* code, in which
        case ``error position`` is the offset in ``buf`` of the bad record.
        """
        ...


class RecordScanner(Protocol):
    """Bulk work on page records: scanning, counting, building their wire form."""

    @property
    def name(self) -> str:
        """``"c"`` or ``"python"``: for reports and test ids."""
        ...

    def channel(
        self, blocks: Sequence[BlockSpec], *, target_page_size: int, postcopy: bool
    ) -> ChannelScanner:
        """Fresh scan state for one channel over ``blocks``."""
        ...

    def tally(self, records: bytes, nblocks: int) -> list[tuple[int, int]]:
        """(normal, zero) page-record counts per block index."""
        ...

    def encode(
        self, blocks: tuple[str, ...], target_page_size: int, records: bytes, data: BytesLike
    ) -> bytes:
        """The wire form of packed records; raises LocalProtocolError (kind bad_value)."""
        ...


def c_scanner() -> RecordScanner:
    """The C scanner; ImportError when the compiled core ``uffd._native`` is not built."""
    module = importlib.import_module("postcopy.wire._cscan")
    scanner: RecordScanner = module.C_SCANNER
    return scanner


@functools.cache
def default_scanner() -> RecordScanner:
    """The C scanner if ``uffd._native`` is importable, else the pure-Python reference."""
    try:
        return c_scanner()
    except ImportError:
        from ._ramscan_ref import PYTHON_SCANNER

        return PYTHON_SCANNER
