"""Cost as the guest grows: one idle migration per guest size, each role in its own process.

Why two processes: the two roles in one process share one heap and one RSS, so
neither side's memory could be told apart. Here the destination and the source
are each ``python3 bench/_growth.py dest|source`` (the same code the parent
imported), connected over loopback TCP, each with a built-in guest of 4 KiB
pages whose vCPUs are nearly idle (one access a second): anonymous memory on
the source, memfds the destination allocates before the stream (its default).

What each process measures about itself (printed by bench/migration.py):

* **memory beyond the guest** = resident memory (``/proc/self/statm``) minus the
  guest's resident pages, minus the same difference just before the role was
  built (the Python interpreter, the libraries, the guest object: not the
  migration's). The guest's resident pages are counted exactly from
  ``/proc/self/pagemap``: present and mapped by this process only, which leaves
  out the shared zero page (UFFDIO_ZEROPAGE places it for zero pages, and RSS
  does not count it); a destination's preallocated guest is all of its shared
  memory (``RssShmem``, once per mapping). Sampled while the migration runs (a sampler thread; every
  0.6 s per GiB of guest, 0.05 s at least, since one count walks the guest's page
  tables: ~17 ms of CPU per GiB; the resident set is read before the count, so a
  page placed during the count is never charged to the service), and bounded from
  below by the kernel's peak RSS (``VmHWM``) minus the guest at the end. The figure
  is the larger of the two: the peak seen, a lower bound of the true peak.
* **CPU seconds** = ``getrusage(RUSAGE_SELF)`` over the migration (the source's
  ``migrate()``, the destination's ``serve()``) minus the guest's vCPU threads
  and the bench's own threads (the sampler, the thread profiler), those read
  per thread from ``/proc/self/task/*/schedstat`` (bench/migration.py's
  ThreadProfile). Kernel time spent for the role (UFFDIO_COPY, socket copies,
  page allocation) is the role's.
* **seconds per GiB** = the source's ``migrate()`` wall time (connect to
  completed) / guest GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

GiB = 1 << 30
KiB = 1 << 10
MiB = 1 << 20
PAGE = 4096
RESULT_TAG = "GROWTH_RESULT "
TARGET_MEMORY_FRACTION = 0.01      # issue 13: the service's own memory <= 1% of the guest
#: both guests plus this much for the two processes and whatever else runs here
FIT_MARGIN = 512 * MiB
GUEST_RESIDENT_FRACTION = 0.9

_PM_PRESENT = np.uint64(1 << 63)
_PM_EXCLUSIVE = np.uint64(1 << 56)


# ------------------------------------------------------------------- memory probes


class PagemapCounter:
    """Counts the bytes of ``ranges`` (address, length; 4 KiB-page anonymous memory of this
    process) backed by a page of their own: present in /proc/self/pagemap and mapped
    exclusively (the shared zero page is neither counted in RSS nor exclusive).

    Its buffers are allocated and touched once, when it is made: counting allocates
    nothing (a count in the sampler thread would otherwise leave megabytes of temporaries
    in that thread's malloc arena, counted as the role's memory)."""

    CHUNK = 1 << 15                     # pages per read (256 KiB of entries, 128 MiB of memory)

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.ranges = ranges
        self._fd = os.open("/proc/self/pagemap", os.O_RDONLY)
        self._entries = np.ones(self.CHUNK, dtype=np.uint64)
        self._masked = np.ones(self.CHUNK, dtype=np.uint64)
        self._hits = np.ones(self.CHUNK, dtype=np.bool_)

    def count(self) -> int:
        want = _PM_PRESENT | _PM_EXCLUSIVE
        total = 0
        for addr, length in self.ranges:
            first, npages = addr // PAGE, length // PAGE
            for start in range(0, npages, self.CHUNK):
                n = min(self.CHUNK, npages - start)
                e, m, h = self._entries[:n], self._masked[:n], self._hits[:n]
                got = os.preadv(self._fd, [memoryview(e).cast("B")], (first + start) * 8)
                if got != n * 8:
                    raise OSError(f"short read of /proc/self/pagemap: {got} of {n * 8} bytes")
                np.bitwise_and(e, want, out=m)
                np.equal(m, want, out=h)
                total += int(np.count_nonzero(h))
        return total * PAGE

    def close(self) -> None:
        os.close(self._fd)


class ShmemCounter:
    """The guest's share of the resident set when its memory is memfds (a preallocating
    destination, RamBlock.prefill): all of this process's shared memory (RssShmem), which counts
    each page once per mapping (the guest's and the second one pages are written through)."""

    def count(self) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no RssShmem in /proc/self/status")

    def close(self) -> None:
        pass


def memfd_allocated_bytes(fds: list[int]) -> int:
    """The bytes allocated to these files (a prefilled guest holds every page, zeros too)."""
    return sum(os.fstat(fd).st_blocks * 512 for fd in fds)


def guest_resident_bytes(ranges: list[tuple[int, int]]) -> int:
    """One count (see PagemapCounter)."""
    counter = PagemapCounter(ranges)
    try:
        return counter.count()
    finally:
        counter.close()


def rss_bytes() -> int:
    """This process's resident set (anonymous + file + shmem), from /proc/self/statm."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def vm_hwm_bytes() -> int:
    """The kernel's peak resident set of this process (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def fits(size: int) -> tuple[bool, str]:
    """Whether a migration of ``size`` (a guest on each side) fits in free memory now. The built-in
    guest leaves about 1 page in 8 zero (Guest.fill_initial) and a zero page takes no memory on
    either side (measured: 87.6% of the pages resident on both), so each guest needs
    ``GUEST_RESIDENT_FRACTION`` of its size; the destination preallocates all of its guest's."""
    need, have = int(size * (1 + GUEST_RESIDENT_FRACTION)) + FIT_MARGIN, mem_available()
    return have >= need, (f"needs {need / GiB:.1f} GiB (the source's guest, {GUEST_RESIDENT_FRACTION:.0%} of its "
                          f"pages non-zero, the destination's preallocated, + {FIT_MARGIN // MiB} MiB), "
                          f"MemAvailable {have / GiB:.1f} GiB")


class MemorySampler:
    """Samples (resident - guest resident) in a thread named bench-memory; ``guest``
    fixed (a source's filled guest, which does not change) or counted each time."""

    def __init__(self, ranges: list[tuple[int, int]], interval: float, fixed_guest: int | None = None,
                 shmem: bool = False) -> None:
        self.ranges = ranges
        self.interval = interval
        self.fixed_guest = fixed_guest
        self.samples: list[tuple[int, int]] = []     # (rss, guest)
        # made before the baseline: its buffers are not the role's
        self.counter: PagemapCounter | ShmemCounter = ShmemCounter() if shmem else PagemapCounter(ranges)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)

    def sample(self) -> None:
        # The resident set first: a page placed while the count walks the guest is then in
        # neither figure, or in the count only. Read after the count, it was in the resident
        # set and not in the count, charged to the service: a 256 MiB destination placing
        # 1-2 GB/s showed 4-9 MB "beyond the guest" that VmHWM never saw.
        rss = rss_bytes()
        guest = self.fixed_guest if self.fixed_guest is not None else self.counter.count()
        self.samples.append((rss, guest))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.counter.close()

    def peak_beyond_guest(self) -> int:
        return max((rss - guest for rss, guest in self.samples), default=0)


def sample_interval(size: int) -> float:
    """One count costs ~17 ms of CPU per GiB of guest: keep the sampler near 3% of a core."""
    return min(5.0, max(0.05, 0.6 * size / GiB))


# --------------------------------------------------------------------- one role


@dataclass
class Side:
    """One role's own figures (bytes, seconds)."""

    role: str
    status: str
    baseline_bytes: int             # resident beyond the guest before the role was built (not counted)
    peak_beyond_guest_bytes: int    # the migration's own memory: max(sampled, VmHWM bound) - baseline
    sampled_peak_bytes: int
    hwm_bound_bytes: int
    samples: int
    guest_resident_bytes: int       # at the end
    cpu_s: float                    # the role's threads (rusage minus vCPUs and bench threads)
    cpu_vcpus_s: float
    cpu_bench_s: float
    wall_s: float
    postcopy_s: float
    downtime_ns: int
    cpu_by_role_ms: dict[str, float]


class _Ready:
    """The two children start their migration together: the destination's memory (preallocated:
    seconds at 8 GiB) and the source's guest built first, so that neither's setup is on the
    migration's clock and the source never waits for a PONG behind it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def built(self) -> None:
        """The destination's memory is ready."""
        if self.fd >= 0:
            os.close(self.fd)

    def wait(self) -> None:
        """The source: until the destination's memory is ready (or it has died)."""
        if self.fd >= 0:
            os.read(self.fd, 1)
            os.close(self.fd)


def _run_role(role: str, size: int, fd: int, address: tuple[str, int] | None, ready: _Ready) -> Side:
    from migration import GUEST_VCPUS_ROLE, ThreadProfile

    from postcopy.destination import Destination
    from postcopy.guest import Guest, Pattern
    from postcopy.owner import BuiltinGuest
    from postcopy.source import Source
    from postcopy.spec import GuestSpec
    from uffd import PAGE_4K

    spec = GuestSpec.simple(size, PAGE_4K, vcpus=2, pattern="random", rate_limit=1)
    interval = sample_interval(size)
    if role == "source":
        memory = spec.build_memory()
        guest = Guest(memory, nvcpus=spec.vcpus, pattern=Pattern[spec.pattern.upper()], seed=spec.seed,
                      write_percent=spec.write_percent, rate_limit=spec.rate_limit)
        guest.fill_initial()
        guest.start()
        time.sleep(0.02)
        owner = BuiltinGuest(spec, memory, guest)
        ready.wait()
    else:
        owner = BuiltinGuest(spec)
        ready.built()
    ranges = [(b.addr, b.used_length) for b in owner.memory]
    # a destination preallocates its guest in memfds (BuiltinGuest): counted as shared memory
    memfds = [b.fd for b in owner.memory if b.backing == "memfd" and b.fd is not None]
    sampler = MemorySampler(ranges, interval, shmem=bool(memfds))
    guest0 = sampler.counter.count()
    baseline = rss_bytes() - guest0
    if role == "source":
        sampler.fixed_guest = guest0
    prof = ThreadProfile(0.05, main_role=f"{role} main", keep_bench=True)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    try:
        with prof, sampler:
            if role == "source":
                assert address is not None
                src = Source(owner, preempt=True)
                stats = src.migrate(address, connect_timeout=30.0)
            else:
                dest = Destination(owner, preempt=True)
                with socket.socket(fileno=fd) as listener:
                    stats = dest.serve(listener)
            wall = time.monotonic() - t0
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            sampler.sample()
        # after the sampler: its buffers are gone
        guest1 = memfd_allocated_bytes(memfds) if memfds else guest_resident_bytes(ranges)
        hwm = vm_hwm_bytes()
    finally:
        if role == "source":
            guest.close()
        elif owner.guest is not None:
            owner.guest.stop()
    by_role = prof.by_role()
    vcpus = by_role.get(GUEST_VCPUS_ROLE, {}).get("cpu_ms", 0.0) / 1e3
    bench = by_role.get("bench", {}).get("cpu_ms", 0.0) / 1e3
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    sampled = sampler.peak_beyond_guest()
    # (a memfd guest's pages are in VmHWM once per mapping: the peak bound takes the sampled guest's)
    hwm_bound = hwm - (max(g for _, g in sampler.samples) if memfds and sampler.samples else guest1)
    return Side(role=role, status=stats.status, baseline_bytes=baseline,
                peak_beyond_guest_bytes=max(sampled, hwm_bound) - baseline, sampled_peak_bytes=sampled - baseline,
                hwm_bound_bytes=hwm_bound - baseline, samples=len(sampler.samples), guest_resident_bytes=guest1,
                cpu_s=cpu - vcpus - bench, cpu_vcpus_s=vcpus, cpu_bench_s=bench, wall_s=wall,
                postcopy_s=(stats.finished_ns - stats.stopped_ns) / 1e9 if stats.stopped_ns else 0.0,
                downtime_ns=stats.downtime_ns,
                cpu_by_role_ms={k: round(v["cpu_ms"], 1) for k, v in by_role.items()})


def _run_downtime(role: str, size: int, page_size: int, busy: bool, fd: int,
                  address: tuple[str, int] | None, ready: _Ready) -> dict[str, Any]:
    """One migration for its downtime only: no sampler, no profiler (no bench thread
    wants the GIL while the roles switch). The guest as bench/migration.py's
    ``migrate()`` builds it: 2 vCPUs over random pages, flat out (busy) or one access
    a second each (idle)."""
    from migration import SwitchTrace

    from postcopy.destination import Destination
    from postcopy.guest import Guest, Pattern
    from postcopy.owner import BuiltinGuest
    from postcopy.source import Source
    from postcopy.spec import GuestSpec

    spec = GuestSpec.simple(size, page_size, vcpus=2, pattern="random", rate_limit=0 if busy else 1)
    trace = SwitchTrace()
    if role == "source":
        assert address is not None
        memory = spec.build_memory()
        guest = Guest(memory, nvcpus=spec.vcpus, pattern=Pattern[spec.pattern.upper()], seed=spec.seed,
                      write_percent=spec.write_percent, rate_limit=spec.rate_limit)
        try:
            guest.fill_initial()
            guest.start()
            time.sleep(0.1 if busy else 0.02)
            owner = BuiltinGuest(spec, memory, guest)
            src = Source(owner, preempt=True)
            trace.attach_source(src, owner)
            ready.wait()
            stats = src.migrate(address, connect_timeout=30.0)
        finally:
            guest.close()
            memory.close()
    else:
        owner = BuiltinGuest(spec)
        dest = Destination(owner, preempt=True)
        trace.attach_destination(dest, other_process=True)
        ready.built()
        try:
            with socket.socket(fileno=fd) as listener:
                stats = dest.serve(listener)
        finally:
            if dest.guest is not None:
                dest.guest.stop()
            dest.close()
    return {"role": role, "status": stats.status, "error": str(stats.error or ""),
            "downtime_ns": stats.downtime_ns, "stopped_ns": stats.stopped_ns,
            "trace": {"marks": trace.marks, "sums": trace.sums, "control_ns": trace.control_ns},
            "postcopy_s": (stats.finished_ns - stats.stopped_ns) / 1e9 if stats.stopped_ns else 0.0}


def _child_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="one role of a cost or downtime run (started by measure_cost, "
                                             "measure_downtime)")
    ap.add_argument("role", choices=["source", "dest"])
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--fd", type=int, default=-1, help="dest: the listening socket, inherited")
    ap.add_argument("--connect", default="", help="source: HOST:PORT")
    ap.add_argument("--ready-fd", type=int, default=-1,
                    help="dest: a pipe to close once its memory is built; source: its other end, to wait on")
    ap.add_argument("--downtime", action="store_true", help="a downtime run (no sampler, no profiler)")
    ap.add_argument("--page-size", type=int, default=PAGE, help="--downtime: the guest's page size")
    ap.add_argument("--busy", action="store_true", help="--downtime: vCPUs flat out (else 1 access/s)")
    args = ap.parse_args(argv)
    address = None
    if args.connect:
        host, port = args.connect.rsplit(":", 1)
        address = (host, int(port))
    role = "source" if args.role == "source" else "destination"
    ready = _Ready(args.ready_fd)
    if args.downtime:
        result = _run_downtime(role, args.size, args.page_size, args.busy, args.fd, address, ready)
    else:
        result = asdict(_run_role(role, args.size, args.fd, address, ready))
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# ------------------------------------------------------------------- the parent


@dataclass
class CostRun:
    size: int
    source: Side
    destination: Side

    @property
    def gib(self) -> float:
        return self.size / GiB

    @property
    def s_per_gib(self) -> float:
        return self.source.wall_s / self.gib

    def memory_fraction(self, side: Side) -> float:
        return side.peak_beyond_guest_bytes / self.size

    def verdicts(self) -> dict[str, str]:
        return {s.role: "ok" if self.memory_fraction(s) <= TARGET_MEMORY_FRACTION else "miss"
                for s in (self.source, self.destination)}

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "s_per_gib": self.s_per_gib,
                "source": asdict(self.source), "destination": asdict(self.destination),
                "memory_fraction": {s.role: self.memory_fraction(s) for s in (self.source, self.destination)},
                "cpu_s_per_gib": {s.role: s.cpu_s / self.gib for s in (self.source, self.destination)},
                "memory_target": f"<= {TARGET_MEMORY_FRACTION:.0%} of the guest", "verdicts": self.verdicts()}


def _parse(proc: subprocess.Popen[bytes], out: IO[bytes], name: str, timeout: float) -> dict[str, Any]:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        out.seek(0)
        raise RuntimeError(f"two-process run: the {name} did not finish in {timeout:.0f} s: "
                           f"{out.read().decode(errors='replace')[-3000:]}") from None
    out.seek(0)
    text = out.read().decode(errors="replace")
    for line in text.splitlines():
        if line.startswith(RESULT_TAG):
            result: dict[str, Any] = json.loads(line[len(RESULT_TAG):])
            return result
    raise RuntimeError(f"two-process run: the {name} exited {proc.returncode} without a result: {text[-3000:]}")


def run_pair(size: int, extra: list[str], timeout: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """One migration between two child processes (``python3 bench/_growth.py dest|source``)
    over loopback TCP; each child's result (source, destination)."""
    import postcopy

    root = str(Path(postcopy.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    me = [sys.executable, str(Path(__file__).resolve())]
    with (socket.create_server(("127.0.0.1", 0)) as listener, tempfile.TemporaryFile() as dest_out,
          tempfile.TemporaryFile() as src_out):
        port = listener.getsockname()[1]
        wait_end, ready_end = os.pipe()     # the destination closes its end when its memory is built
        dest = subprocess.Popen([*me, "dest", "--size", str(size), "--fd", str(listener.fileno()),
                                 "--ready-fd", str(ready_end), *extra],
                                pass_fds=(listener.fileno(), ready_end), env=env, stdin=subprocess.DEVNULL,
                                stdout=dest_out, stderr=subprocess.STDOUT)
        listener.close()        # the destination's now
        os.close(ready_end)
        try:
            src = subprocess.Popen([*me, "source", "--size", str(size), "--connect", f"127.0.0.1:{port}",
                                    "--ready-fd", str(wait_end), *extra], pass_fds=(wait_end,),
                                   env=env, stdin=subprocess.DEVNULL, stdout=src_out, stderr=subprocess.STDOUT)
            os.close(wait_end)
            try:
                source = _parse(src, src_out, "source", timeout)
            finally:
                if src.poll() is None:
                    src.kill()
                    src.wait()
            destination = _parse(dest, dest_out, "destination", 60.0)
        finally:
            if dest.poll() is None:      # ended by its PID: a source that failed leaves it waiting
                dest.kill()
                dest.wait()
    return source, destination


def measure_cost(size: int, timeout: float = 300.0) -> CostRun:
    """One idle migration of ``size`` bytes of 4 KiB pages between two child processes."""
    s, d = run_pair(size, [], timeout)
    source, destination = Side(**s), Side(**d)
    for side in (source, destination):
        if side.status != "completed":
            raise RuntimeError(f"cost run {size // MiB} MiB: the {side.role} ended {side.status}")
    return CostRun(size, source, destination)


@dataclass
class DowntimeRun:
    """One two-process migration's downtime: the source's MigrationStats.downtime_ns
    (its guest's stop -> PONG 3's arrival at the source), each role in its own process."""

    size: int
    page_size: int
    busy: bool
    downtime_ns: int
    postcopy_s: float
    phases_ns: dict[str, int]       # bench/migration.py's SwitchTrace phases, from both processes' marks


def measure_downtime(size: int, page_size: int, busy: bool, timeout: float = 120.0) -> DowntimeRun:
    """One migration of ``size`` bytes (busy or idle guest) between two child processes, for its downtime."""
    extra = ["--downtime", "--page-size", str(page_size), *(["--busy"] if busy else [])]
    s, d = run_pair(size, extra, timeout)
    for r in (s, d):
        if r["status"] != "completed":
            raise RuntimeError(f"downtime run {size // MiB} MiB page {page_size}: the {r['role']} ended "
                               f"{r['status']} ({r['error']})")
    from migration import SwitchTrace

    trace = SwitchTrace.merge(s["trace"], d["trace"])
    phases = trace.all_ns(int(s["stopped_ns"]), int(s["downtime_ns"]))
    return DowntimeRun(size, page_size, busy, int(s["downtime_ns"]), float(s["postcopy_s"]), phases)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
