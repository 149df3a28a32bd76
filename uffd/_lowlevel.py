"""The one importer of the compiled C core (``uffd._native``).

Other modules of the package reach ``ffi``/``lib`` through here. Every C call
releases the GIL; C functions return 0 / a count or ``-errno``.
"""

from __future__ import annotations

import os

from uffd._native import ffi, lib

__all__ = ["check_range_u64", "errno_message", "ffi", "lib"]

U64_MAX = (1 << 64) - 1


def errno_message(err: int) -> str:
    return os.strerror(err)


def check_range_u64(op: str, **operands: int) -> None:
    """Reject operands that cannot be C ``uint64_t`` with a message naming them."""
    for name, value in operands.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
        if value < 0 or value > U64_MAX:
            raise ValueError(f"{op}: {name}={value} is outside 0..2**64-1")
