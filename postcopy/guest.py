"""The built-in synthetic guest: vCPU threads in C over plain RAM regions.

The vCPUs are pthreads created by the C core (``uffd/csrc/guest.c``), so they
touch guest memory without the GIL: on a destination whose memory is registered
with userfaultfd, a vCPU that touches a missing page blocks in the kernel until
the page-fault service places it, and the rest of the process keeps running.

Every access is a function of (seed, vCPU, step), so :meth:`Guest.verify` can
replay the workload and predict every page exactly; the guest's position in
that workload (:meth:`Guest.save_state`) is the device state a migration
carries, and the destination continues where the source stopped.

Regions are plain ``(addr, length, host_page_size)`` tuples: the caller owns
the memory and must keep it mapped for as long as the :class:`Guest` exists.
Every call into C runs with the GIL released (cffi does so).
"""

from __future__ import annotations

import enum
import errno
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, NamedTuple

from uffd._lowlevel import U64_MAX
from uffd._native import ffi, lib

__all__ = [
    "DEFAULT_SEED",
    "MAX_VCPUS",
    "TARGET_PAGE_SIZE",
    "Guest",
    "GuestBusyError",
    "GuestConfigError",
    "GuestStateError",
    "GuestStats",
    "Mismatch",
    "MismatchDetail",
    "MismatchKind",
    "Pattern",
    "Region",
    "VerifyResult",
]

TARGET_PAGE_SIZE: int = lib.PC_GUEST_TARGET_PAGE_SIZE
MAX_VCPUS: int = lib.PC_GUEST_MAX_VCPUS
DEFAULT_SEED = 0x5EED
_ERR_CAP = 512



class GuestConfigError(ValueError):
    """The guest's configuration (regions, vCPUs, pattern, ...) is invalid."""


class GuestStateError(ValueError):
    """Saved guest state bytes are malformed or belong to a differently configured guest."""

    def __init__(self, message: str, errno_value: int) -> None:
        super().__init__(message)
        self.errno = errno_value


class GuestBusyError(RuntimeError):
    """The operation needs the vCPUs stopped and joined, and they are not."""


class Pattern(enum.IntEnum):
    """Which pages the vCPUs access."""

    SEQ = lib.PC_GUEST_PATTERN_SEQ  # each vCPU walks its share of pages in order, pass after pass
    RANDOM = lib.PC_GUEST_PATTERN_RANDOM  # uniform pages from a per-vCPU PRNG
    HOT = lib.PC_GUEST_PATTERN_HOT  # 10% of the pages take 90% of the accesses


class MismatchKind(enum.IntEnum):
    """What verification thinks happened to a page."""

    ZERO = lib.PC_GUEST_MISMATCH_ZERO  # all zero where data was expected
    COUNTER = lib.PC_GUEST_MISMATCH_COUNTER  # only vCPU counters differ: lost/stale updates
    FOREIGN = lib.PC_GUEST_MISMATCH_FOREIGN  # content of another page (wrong offset)
    CONTENT = lib.PC_GUEST_MISMATCH_CONTENT  # anything else (corrupted bytes)


class Region(NamedTuple):
    addr: int
    length: int
    host_page_size: int


@dataclass(frozen=True, slots=True)
class MismatchDetail:
    """Why one page differs; ``str()`` gives a one-line explanation."""

    kind: MismatchKind
    byte_offset: int
    """First differing 8-byte word, offset inside the 4 KiB page."""
    expected: int
    actual: int
    vcpu: int | None = None
    """For COUNTER: the vCPU whose slot differs."""
    origin: tuple[int, int] | None = None
    """For FOREIGN: (region_index, offset) of the page this content belongs to."""

    def __str__(self) -> str:
        where = f"word at +{self.byte_offset:#x}: expected {self.expected:#018x}, got {self.actual:#018x}"
        if self.kind is MismatchKind.ZERO:
            return f"page is all zero where data was expected ({where})"
        if self.kind is MismatchKind.COUNTER:
            behind = (self.expected - self.actual) % 2**64
            lag = (
                f"{behind} update(s) behind"
                if behind < 2**63
                else f"{2**64 - behind} update(s) ahead"
            )
            return f"vCPU {self.vcpu} counter is {lag}: stale or lost update ({where})"
        if self.kind is MismatchKind.FOREIGN and self.origin is not None:
            region, offset = self.origin
            return f"holds the content of region {region} offset {offset:#x} ({where})"
        return f"content differs ({where})"


class Mismatch(NamedTuple):
    region_index: int
    offset: int
    """Byte offset of the 4 KiB page inside its region."""
    detail: MismatchDetail


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: bool
    pages_checked: int
    pages_mismatched: int
    first_mismatches: list[Mismatch]
    read_hash_ok: bool
    """Every vCPU read what the replay says it should have read."""
    state_ok: bool = True
    """Every vCPU's counters, PRNG and position agree with the replay."""
    bad_read_hash_vcpus: tuple[int, ...] = ()
    bad_state_vcpus: tuple[int, ...] = ()

    def summary(self) -> str:
        if self.ok:
            return f"ok: {self.pages_checked} pages match the replay"
        parts = [f"{self.pages_mismatched} of {self.pages_checked} pages differ"]
        parts += [
            f"region {m.region_index} offset {m.offset:#x}: {m.detail}"
            for m in self.first_mismatches
        ]
        if not self.read_hash_ok:
            parts.append(f"read hash differs for vCPU(s) {list(self.bad_read_hash_vcpus)}")
        if not self.state_ok:
            parts.append(f"state differs from the replay for vCPU(s) {list(self.bad_state_vcpus)}")
        return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class GuestStats:
    """Per-vCPU counters (index = vCPU); read while running they are a moment's snapshot."""

    steps: tuple[int, ...]
    reads: tuple[int, ...]
    writes: tuple[int, ...]

    @property
    def total_steps(self) -> int:
        return sum(self.steps)


def _bits(mask: int) -> tuple[int, ...]:
    return tuple(v for v in range(32) if mask >> v & 1)


def _check_uint(name: str, value: object, limit: int = U64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise GuestConfigError(f"{name}={value!r}: must be an integer in 0..{limit}")
    return value


def _as_region(index: int, region: object) -> Region:
    """A (addr, length, host_page_size) tuple, or anything shaped like uffd.RamBlock."""
    if all(hasattr(region, a) for a in ("addr", "used_length", "page_size")):
        r: Any = region
        return Region(r.addr, r.used_length, r.page_size)
    if isinstance(region, tuple | list) and len(region) == 3:
        return Region(*region)
    raise GuestConfigError(
        f"region {index}: expected (addr, length, host_page_size) or a RAM block, got {region!r}"
    )


class Guest:
    """A synthetic guest over ``regions``: ``(addr, length, host_page_size)`` tuples
    (or objects with ``addr``, ``used_length`` and ``page_size``, like ``uffd.RamBlock``).

    Lifecycle: ``fill_initial()`` on a source (the destination gets its memory
    from the migration instead), ``start()``, ``stop()``, ``save_state()``; on the
    destination ``load_state()`` then ``start()``. ``verify()`` needs the vCPUs
    stopped and every page readable.

    Stopping waits for every vCPU to reach an access boundary; a vCPU blocked in
    a userfaultfd fault gets there only once its page is placed, so whoever
    serves faults must keep serving until :meth:`stop` (or :meth:`join`) returns,
    or use :meth:`request_stop` plus :meth:`wait` with a timeout between batches.

    The vCPUs run at ``nice`` (None: the nice of the thread that builds the guest),
    whichever thread starts them.
    """

    def __init__(
        self,
        regions: Iterable[tuple[int, int, int] | Any],
        nvcpus: int = 2,
        pattern: Pattern = Pattern.SEQ,
        seed: int = DEFAULT_SEED,
        write_percent: int = 50,
        rate_limit: int = 0,
        nice: int | None = None,
    ) -> None:
        region_list = [_as_region(i, r) for i, r in enumerate(regions)]
        if not region_list:
            raise GuestConfigError("a guest needs at least one region")
        for i, r in enumerate(region_list):
            for field, value in zip(Region._fields, r, strict=True):
                _check_uint(f"region {i} {field}", value)
        _check_uint("nvcpus", nvcpus, 2**32 - 1)
        _check_uint("write_percent", write_percent, 2**32 - 1)
        _check_uint("seed", seed)
        _check_uint("rate_limit", rate_limit)
        try:
            pattern = Pattern(pattern)
        except ValueError:
            raise GuestConfigError(
                f"pattern={pattern!r}: must be one of {[p.name for p in Pattern]}"
            ) from None

        c_regions = ffi.new("pc_guest_region[]", len(region_list))
        for i, r in enumerate(region_list):
            c_regions[i].addr = r.addr
            c_regions[i].length = r.length
            c_regions[i].host_page_size = r.host_page_size
        err = ffi.new("char[]", _ERR_CAP)
        raw = lib.pc_guest_new(
            c_regions,
            len(region_list),
            nvcpus,
            pattern,
            seed,
            write_percent,
            rate_limit,
            os.getpriority(os.PRIO_PROCESS, 0) if nice is None else nice,
            err,
            _ERR_CAP,
        )
        if raw == ffi.NULL:
            raise GuestConfigError(f"guest: {ffi.string(err).decode()}")
        # Safety net only: freeing stops and joins the vCPUs, so close() explicitly
        # while faults can still be served.
        self._g: Any = ffi.gc(raw, lib.pc_guest_free)
        self.regions: tuple[Region, ...] = tuple(region_list)
        self.nvcpus = nvcpus
        self.pattern = pattern
        self.seed = seed
        self.write_percent = write_percent
        self.rate_limit = rate_limit
        self.total_pages: int = lib.pc_guest_total_pages(self._g)

    # -- lifetime -----------------------------------------------------------------

    def close(self) -> None:
        """Stop the vCPUs (see the class note on faults) and free the C object."""
        if self._g is not None:
            g, self._g = self._g, None
            ffi.release(g)

    def __enter__(self) -> Guest:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _handle(self) -> Any:
        if self._g is None:
            raise ValueError("operation on a closed guest")
        return self._g

    def _busy(self, what: str) -> GuestBusyError:
        return GuestBusyError(f"cannot {what} while the vCPUs run: stop() or join() them first")

    # -- memory -------------------------------------------------------------------

    def fill_initial(self) -> None:
        """Write every page's initial content (about 1 page in 8 stays zero)."""
        rc = lib.pc_guest_fill_initial(self._handle())
        if rc == -errno.EBUSY:
            raise self._busy("fill guest memory")

    def initial_content(
        self, region_index: int, offset: int, length: int = TARGET_PAGE_SIZE
    ) -> bytes:
        """Initial content of ``length`` bytes at ``offset`` of a region (4 KiB multiples).

        Serves faults of a fresh destination guest, e.g. one whole host page.
        """
        g = self._handle()
        in_range = 0 <= region_index < 2**32 and 0 <= offset < 2**64 and 0 <= length < 2**64
        out = ffi.new("char[]", length) if in_range and length > 0 else ffi.NULL
        rc = lib.pc_guest_initial_content(g, region_index, offset, length, out) if in_range else -1
        if rc < 0:
            lengths = [hex(r.length) for r in self.regions]
            raise ValueError(
                f"no initial content for region {region_index} offset {offset:#x} length {length:#x}: "
                f"need a region index below {len(self.regions)} and a 4 KiB-aligned range inside "
                f"it (region lengths {lengths})"
            )
        return bytes(ffi.buffer(out, length)) if length > 0 else b""

    def initial_page(self, region_index: int, offset: int) -> bytes:
        """The initial content of the 4 KiB page at ``offset`` of a region."""
        return self.initial_content(region_index, offset, TARGET_PAGE_SIZE)

    # -- running ------------------------------------------------------------------

    def prepare(self) -> None:
        """Make the vCPU threads now, parked until :meth:`start` (which then makes none):
        a destination starts its guest inside the downtime, where making two threads took
        80-300 us and the new threads, with their creator's priority until they lower it,
        took its CPU. They touch nothing until started; close() ends them unstarted."""
        rc = lib.pc_guest_prepare(self._handle())
        if rc == -errno.EBUSY:
            raise GuestBusyError("guest already started: join() or stop() it first")
        if rc < 0:
            raise OSError(-rc, f"making vCPU threads: {errno.errorcode.get(-rc, rc)}")

    def start(self, nsteps: int = 0) -> None:
        """Start every vCPU; each stops by itself after ``nsteps`` more accesses (0 = never)."""
        _check_uint("nsteps", nsteps)
        rc = lib.pc_guest_start(self._handle(), nsteps)
        if rc == -errno.EBUSY:
            raise GuestBusyError("guest already started: join() or stop() it first")
        if rc < 0:
            raise OSError(-rc, f"starting vCPU threads: {errno.errorcode.get(-rc, rc)}")

    def request_stop(self) -> None:
        """Ask every vCPU to stop at its next access boundary; returns at once."""
        lib.pc_guest_request_stop(self._handle())

    def set_throttle(self, percent: int) -> None:
        """Auto-converge (QEMU's cpu throttle): every vCPU sleeps ``percent`` % of the time,
        in 10 ms run slices (0: full speed; at most 99). Takes effect while running."""
        if not 0 <= percent <= 99:
            raise ValueError(f"throttle {percent} %: must be within 0-99")
        lib.pc_guest_set_throttle(self._handle(), percent)

    @property
    def throttle(self) -> int:
        return int(lib.pc_guest_throttle(self._handle()))

    def set_vcpu_nice(self, nice: int | None) -> int:
        """Run every vCPU (the running ones and those started later) at ``nice`` (-20..19),
        or with None each back at the nice it started with. Returns the threads changed.
        Raising a priority again needs CAP_SYS_NICE (or RLIMIT_NICE): PermissionError."""
        if nice is not None and not -20 <= nice <= 19:
            raise ValueError(f"nice {nice}: must be within -20..19")
        rc = int(lib.pc_guest_set_vcpu_nice(self._handle(), lib.PC_GUEST_NICE_KEEP if nice is None else nice))
        if rc < 0:
            raise OSError(-rc, f"setpriority of a vCPU thread: {os.strerror(-rc)}")
        return rc

    @property
    def vcpu_nice(self) -> int | None:
        """The nice set by :meth:`set_vcpu_nice` (None: the vCPUs keep their own)."""
        nice = int(lib.pc_guest_vcpu_nice(self._handle()))
        return None if nice == lib.PC_GUEST_NICE_KEEP else nice

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every vCPU has left its loop; False on timeout."""
        timeout_ns = -1 if timeout is None else min(max(0, math.ceil(timeout * 1e9)), 2**62)
        return bool(lib.pc_guest_wait(self._handle(), timeout_ns) == 0)

    def join(self) -> None:
        """Wait for the vCPU threads to finish (they must be stopping or bounded by nsteps)."""
        lib.pc_guest_join(self._handle())

    def stop(self) -> None:
        """request_stop() + wait(): returns once no vCPU runs guest code and their state is
        written back (one asleep in its rate limit is stopped there, not woken). The threads
        end after that: join() waits for them, start() and prepare() join them first. Keep
        serving faults meanwhile (see the class note)."""
        lib.pc_guest_stop(self._handle())

    def run(self, nsteps: int) -> None:
        """Run every vCPU for exactly ``nsteps`` more accesses and join them."""
        if nsteps <= 0:
            raise ValueError(f"nsteps={nsteps}: must be positive")
        self.start(nsteps)
        self.join()

    @property
    def running(self) -> int:
        """Number of vCPUs still inside their loop."""
        return int(lib.pc_guest_running(self._handle()))

    def vcpu_tids(self, wait: float = 1.0) -> list[int]:
        """Kernel thread ids of the running vCPUs (what userfaultfd's THREAD_ID reports);
        waits up to ``wait`` seconds for freshly started vCPUs to record theirs."""
        out = ffi.new("uint32_t[]", max(1, self.nvcpus))
        lib.pc_guest_wait_vcpu_tids(self._handle(), out, self.nvcpus, int(wait * 1e9))
        return [int(out[v]) for v in range(self.nvcpus)]

    def stats(self) -> GuestStats:
        out = ffi.new("pc_guest_vcpu_stats[]", self.nvcpus)
        lib.pc_guest_stats(self._handle(), out, self.nvcpus)
        return GuestStats(
            steps=tuple(int(s.steps) for s in out),
            reads=tuple(int(s.reads) for s in out),
            writes=tuple(int(s.writes) for s in out),
        )

    # -- state ----------------------------------------------------------------------

    def state_size(self) -> int:
        """How many bytes :meth:`save_state` gives."""
        return int(lib.pc_guest_state_size(self._handle()))

    def save_state(self) -> bytes:
        """The guest's device state: versioned little-endian bytes (vCPUs must be stopped)."""
        g = self._handle()
        size = self.state_size()
        buf = ffi.new("char[]", size)
        rc = lib.pc_guest_save_state(g, buf, size)
        if rc == -errno.EBUSY:
            raise self._busy("save guest state")
        if rc < 0:  # pragma: no cover - the buffer is sized by the C side
            raise OSError(-rc, "saving guest state")
        return bytes(ffi.buffer(buf, rc))

    def load_state(self, data: bytes | bytearray | memoryview) -> None:
        """Continue from ``data`` (from :meth:`save_state` of an identically configured guest).

        Raises GuestStateError (a ValueError) naming what is wrong with the bytes.
        """
        err = ffi.new("char[]", _ERR_CAP)
        src = ffi.from_buffer(data)
        rc = lib.pc_guest_load_state(self._handle(), src, len(src), err, _ERR_CAP)
        if rc == -errno.EBUSY:
            raise self._busy("load guest state")
        if rc < 0:
            raise GuestStateError(f"bad guest state: {ffi.string(err).decode()}", -rc)

    # -- verification ---------------------------------------------------------------

    def verify(self, max_mismatches: int = 8) -> VerifyResult:
        """Replay every vCPU and compare every page and every read hash.

        Cost is O(steps + pages). Every page is read, so on a destination all
        pages must be placed first (or faults served while this runs).
        """
        res = ffi.new("pc_guest_verify_result *")
        cap = max(0, max_mismatches)
        mm = ffi.new("pc_guest_mismatch[]", max(1, cap))
        rc = lib.pc_guest_verify(self._handle(), res, mm, cap)
        if rc == -errno.EBUSY:
            raise self._busy("verify guest memory")
        if rc == -errno.ENOMEM:
            raise MemoryError(
                f"verify needs {self.total_pages * self.nvcpus * 8} bytes of counters"
            )
        if rc < 0:  # pragma: no cover
            raise OSError(-rc, "verifying guest memory")
        mismatches = [self._mismatch(mm[i]) for i in range(res.mismatches_reported)]
        hash_bad = _bits(res.read_hash_bad_mask)
        state_bad = _bits(res.state_bad_mask)
        return VerifyResult(
            ok=res.pages_mismatched == 0 and not hash_bad and not state_bad,
            pages_checked=int(res.pages_checked),
            pages_mismatched=int(res.pages_mismatched),
            first_mismatches=mismatches,
            read_hash_ok=not hash_bad,
            state_ok=not state_bad,
            bad_read_hash_vcpus=hash_bad,
            bad_state_vcpus=state_bad,
        )

    @staticmethod
    def _mismatch(m: Any) -> Mismatch:
        kind = MismatchKind(m.kind)
        detail = MismatchDetail(
            kind=kind,
            byte_offset=int(m.byte_offset),
            expected=int(m.expected),
            actual=int(m.actual),
            vcpu=int(m.vcpu) if kind is MismatchKind.COUNTER else None,
            origin=(int(m.origin_region), int(m.origin_offset)) if m.origin_region >= 0 else None,
        )
        return Mismatch(int(m.region), int(m.offset), detail)

    def __repr__(self) -> str:
        return (
            f"Guest(regions={len(self.regions)}, pages={self.total_pages}, nvcpus={self.nvcpus}, "
            f"pattern={self.pattern.name}, seed={self.seed:#x}, write_percent={self.write_percent})"
        )
