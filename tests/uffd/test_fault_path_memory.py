"""Nothing on the fault path touches fresh memory when the switch releases it: on a VM whose host
backs memory lazily each first touch of a page cost 60-270 us inside the downtime. The C module's
thread-local storage stays a few words (a thread's copy is allocated and zeroed at its first use of
any __thread variable: the module is loaded with dlopen; see uffd/csrc/core.h), a thread on the
fault path has its stack written before it waits, and bitmaps have their pages when made."""

from __future__ import annotations

import resource
import struct
import threading
from pathlib import Path

import uffd._native
from postcopy._link import touch_stack
from uffd import Bitmap

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


def _minor_faults_of(call: object) -> int:
    """Minor page faults the calling thread takes in ``call()``."""
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    call()      # type: ignore[operator]
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


def test_a_touched_stack_takes_no_page_faults_later() -> None:
    faults: dict[str, int] = {}

    def thread() -> None:
        faults["first"] = _minor_faults_of(lambda: touch_stack(256 << 10))
        faults["again"] = _minor_faults_of(lambda: touch_stack(256 << 10))

    t = threading.Thread(target=thread)
    t.start()
    t.join()
    assert faults["first"] >= 32, faults       # a fresh thread's stack: 64 pages not there yet
    assert faults["again"] <= 2, faults         # written once: there now


def test_a_bitmap_has_its_pages_when_made() -> None:
    bits = 1 << 26      # 8 MiB of words
    b = Bitmap(bits)
    assert _minor_faults_of(lambda: b.set_range(0, bits)) <= 8
    assert b.count() == bits
