"""The C module's thread-local storage stays a few words: a thread's copy of it is allocated and
zeroed at the thread's first use of any __thread variable (the module is loaded with dlopen), and
the fault service and the preempt receiver make that first use when the switch releases them,
inside the downtime (see the note in uffd/csrc/core.h)."""

from __future__ import annotations

import struct
from pathlib import Path

import uffd._native

PT_TLS = 7
MAX_TLS_BYTES = 256


def tls_segment_size(path: Path) -> int:
    """The memory size of an ELF64 little-endian file's PT_TLS segment (0: none)."""
    data = path.read_bytes()
    assert data[:6] == b"\x7fELF\x02\x01", f"{path}: not an ELF64 little-endian file"
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == PT_TLS:
            p_memsz, = struct.unpack_from("<Q", data, phoff + i * phentsize + 0x28)
            return int(p_memsz)
    return 0


def test_the_native_module_keeps_its_thread_local_storage_small() -> None:
    path = Path(uffd._native.__file__)
    size = tls_segment_size(path)
    assert size <= MAX_TLS_BYTES, (
        f"{path.name} has {size} bytes of thread-local storage: every thread that touches a __thread "
        f"variable gets them allocated and zeroed then (put big buffers in the objects)")
