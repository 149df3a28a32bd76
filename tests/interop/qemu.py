"""Real QEMU for interop tests and benchmarks: start, drive over QMP, read serial, dump and compare RAM.

The guest is the 512-byte boot sector of ``tests/data/qemu-7.2/boot.img``
(``guest.asm``): in long mode it loops forever incrementing the first byte of
every 4 KiB page from 1 MiB to the top of RAM, and prints one letter A..Z to
COM1 after each full pass.  Registers: RAX = the page it is at, R13 = passes
completed.  That makes a migrated guest checkable page by page: every byte of
the destination equals the stopped source's, except each page's first byte,
which moved by exactly the increments the guest made since it runs there.

Processes are ours: started here, ended by PID (``quit`` over QMP first).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


__all__ = [
    "BOOT_IMG",
    "POSTCOPY_CAPS",
    "MemoryCheck",
    "PostcopyProcess",
    "Qemu",
    "compare_guest_memory",
    "free_port",
    "guest_letters",
    "hugetlbfs_mount",
    "migrate_qemu_to_qemu",
    "migrate_qemu_to_us",
    "qemu_file_restore",
    "restore_into_qemu",
]

DATA = Path(__file__).resolve().parent.parent / "data" / "qemu-7.2"
BOOT_IMG = DATA / "boot.img"
QEMU_BIN = os.environ.get("POSTCOPY_QEMU", "qemu-system-x86_64")
#: QEMU trace events (to its log) at a migration's end: a migration that fails with no error-desc
#: (a failed last write, a return path that ended badly) then says which step it was
_END_TRACES = ("migration_completion_file_err", "migration_return_path_end_after", "migrate_fd_error",
               "source_return_path_thread_bad_end", "source_return_path_thread_shut")
MiB = 1 << 20
POSTCOPY_CAPS = ("events", "postcopy-ram", "return-path")
_BANNER_END = b"Booting from Hard Disk"
REPO = Path(__file__).resolve().parent.parent.parent
_REG = re.compile(r"\b(RAX|R13)=([0-9a-fA-F]{16})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_tcp(port: int) -> None:
    """Kill both ends of every TCP connection to local ``port`` (``ss -K``: RST, as a broken link)."""
    subprocess.run(["ss", "-K", "-t", f"( dport = :{port} or sport = :{port} )"], check=True,
                   stdout=subprocess.DEVNULL)


@contextlib.contextmanager
def hugetlbfs_mount(pagesize: str = "2M") -> Iterator[Path]:
    """A private hugetlbfs mount (root), unmounted afterwards."""
    d = Path(tempfile.mkdtemp(prefix="pc-huge-"))
    subprocess.run(["mount", "-t", "hugetlbfs", "-o", f"pagesize={pagesize}", "none", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)
        d.rmdir()


def guest_letters(serial: bytes, *, after_banner: bool) -> bytes:
    """The pass letters the guest printed (the source's SeaBIOS banner dropped)."""
    if after_banner:
        i = serial.find(_BANNER_END)
        if i < 0:
            return b""
        serial = serial[i + len(_BANNER_END):]
    return bytes(c for c in serial if 65 <= c <= 90)


class QmpError(RuntimeError):
    """QEMU answered a QMP command with an error."""


class QmpClient:
    """A blocking QMP client over a unix socket: greeting, qmp_capabilities, then one
    command at a time (asynchronous events in between are kept in ``events``)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.events: list[dict[str, Any]] = []
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
            self._file = self._sock.makefile("rb")
            greeting = self._read()
            if "QMP" not in greeting:
                raise QmpError(f"not a QMP greeting: {greeting}")
            self.cmd("qmp_capabilities")
        except BaseException:
            self._sock.close()      # a refused connect (QEMU not listening yet) is retried: leak nothing
            raise

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise ConnectionError("QMP connection closed")
        message: dict[str, Any] = json.loads(line)
        return message

    def cmd(self, name: str, **args: Any) -> Any:
        request: dict[str, Any] = {"execute": name}
        if args:
            request["arguments"] = args
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise QmpError(f"{name}: {reply['error'].get('desc', reply['error'])}")
            elif "return" in reply:
                return reply["return"]

    def set_timeout(self, seconds: float) -> None:
        self._sock.settimeout(seconds)

    def close(self) -> None:
        self._file.close()
        self._sock.close()


@dataclass
class Qemu:
    """One qemu-system-x86_64 process: TCG, the boot-sector guest, QMP on a unix socket, serial to a file."""

    name: str
    rundir: Path
    mem: str = "64M"
    incoming: bool = False
    hugetlbfs: Path | None = None  # memory-backend-file on this mount (2 MiB pages)
    accel: str = "tcg"
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    qmp: QmpClient | None = None

    def __post_init__(self) -> None:
        self.rundir.mkdir(parents=True, exist_ok=True)
        # AF_UNIX paths are limited to 107 bytes: keep the socket in a short directory
        self._sockdir = Path(tempfile.mkdtemp(prefix="pcq-"))
        self.qmp_path = self._sockdir / "qmp.sock"
        self.serial_path = self.rundir / f"{self.name}.serial"
        self.log_path = self.rundir / f"{self.name}.log"
        self.disk = self.rundir / f"{self.name}.img"  # a copy: IDE cannot be read-only, the repo's stays clean
        shutil.copyfile(BOOT_IMG, self.disk)

    @property
    def mem_bytes(self) -> int:
        units = {"K": 10, "M": 20, "G": 30}
        return int(self.mem[:-1]) << units[self.mem[-1].upper()]

    def argv(self) -> list[str]:
        argv = [QEMU_BIN, "-name", self.name, "-accel", self.accel, "-cpu", "max" if self.accel == "tcg" else "host",
                "-m", self.mem, "-smp", "1", "-nodefaults", "-nographic",
                "-drive", f"file={self.disk},format=raw,if=ide",
                "-serial", f"file:{self.serial_path}",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        for event in _END_TRACES:
            argv += ["-trace", event]
        if self.hugetlbfs is not None:
            argv += ["-object", f"memory-backend-file,id=mem0,size={self.mem},mem-path={self.hugetlbfs},share=on",
                     "-machine", "pc,memory-backend=mem0"]
        else:
            argv += ["-machine", "pc"]
        if self.incoming:
            argv += ["-incoming", "defer"]
        return argv + self.extra

    def start(self, timeout: float = 20.0) -> Qemu:
        with contextlib.suppress(FileNotFoundError):
            self.serial_path.unlink()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.qmp_path.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: qemu exited {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no QMP socket after {timeout} s: {self.log()}")
            time.sleep(0.01)
        while True:
            try:
                self.qmp = QmpClient(str(self.qmp_path))
                return self
            except ConnectionRefusedError:      # the socket file exists a moment before QEMU listens on it
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return ""

    def cmd(self, name: str, **args: Any) -> Any:
        assert self.qmp is not None, "not started"
        try:
            return self.qmp.cmd(name, **args)
        except OSError as e:    # QMP dropped: QEMU died; say how, with its log (its last words)
            rc = None
            if self.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    rc = self.proc.wait(timeout=3)
            raise RuntimeError(f"{self.name}: QMP {name} failed ({e}); qemu exit status {rc}\n"
                               f"--- {self.name} log:\n{self.log()}") from e

    def hmp(self, line: str) -> str:
        return str(self.cmd("human-monitor-command", **{"command-line": line}))

    def serial(self) -> bytes:
        try:
            return self.serial_path.read_bytes()
        except FileNotFoundError:
            return b""

    def letters(self) -> bytes:
        return guest_letters(self.serial(), after_banner=not self.incoming)

    def wait_letters(self, n: int, timeout: float = 60.0) -> bytes:
        """Wait until the guest printed at least ``n`` pass letters (here)."""
        deadline = time.monotonic() + timeout
        while len(got := self.letters()) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {len(got)} pass letters after {timeout} s, wanted {n}")
            time.sleep(0.05)
        return got

    def set_capabilities(self, caps: tuple[str, ...] | list[str]) -> None:
        self.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])

    def status(self) -> str:
        return str(self.cmd("query-migrate").get("status", "none"))

    def wait_status(self, want: set[str], timeout: float = 60.0, fail: set[str] | None = None,
                    peer: PostcopyProcess | None = None) -> dict[str, Any]:
        """``peer``: our role on the other end, whose stderr a failure shows too (QEMU often
        fails a migration with no error-desc: its log's trace lines say which step failed)."""
        fail = fail if fail is not None else {"failed", "cancelled"}
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.cmd("query-migrate")
            st = info.get("status")
            if st in want:
                return info
            if st in fail:
                raise RuntimeError(f"{self.name}: migration {st}: {info.get('error-desc', '')}\n--- {self.name} log:\n"
                                   f"{self.log()}{self._peer_log(peer)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: migration status {st!r} after {timeout} s, wanted {want}"
                                   f"{self._peer_log(peer)}")
            time.sleep(0.02)

    @staticmethod
    def _peer_log(peer: PostcopyProcess | None) -> str:
        return f"\n--- {peer.name} stderr:\n{peer.stderr()}" if peer is not None else ""

    def registers(self) -> dict[str, int]:
        return {k: int(v, 16) for k, v in _REG.findall(self.hmp("info registers"))}

    def dump_memory(self, path: Path) -> Path:
        """Guest RAM below the top (the pc machine maps it from 0; < 3.5 GiB here) to a file, via pmemsave."""
        self.cmd("pmemsave", val=0, size=self.mem_bytes, filename=str(path))
        return path

    def stop(self) -> None:
        """``quit`` over QMP, then SIGTERM / SIGKILL this process by PID."""
        if self.proc is None:
            return
        if self.proc.poll() is None and self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.set_timeout(3.0)   # a QEMU stuck in a failed postcopy may never answer
                self.qmp.cmd("quit")
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.close()
        self.proc = None
        self.qmp = None
        shutil.rmtree(self._sockdir, ignore_errors=True)

    def __enter__(self) -> Qemu:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class MemoryCheck:
    pages: int
    identical_low: bool  # below 1 MiB (code, page tables): byte-identical
    other_bytes_mismatch: list[int]  # addresses of pages >= 1 MiB whose bytes 1..4095 differ
    bad_counter_pages: list[int]  # pages whose first byte moved by anything but the guest's own increments
    src_passes: int
    dst_passes: int

    @property
    def ok(self) -> bool:
        return self.identical_low and not self.other_bytes_mismatch and not self.bad_counter_pages


def compare_guest_memory(src_dump: Path, dst_dump: Path, src_regs: dict[str, int], dst_regs: dict[str, int],
                         mem_bytes: int) -> MemoryCheck:
    """B's memory equals A's up to the guest's own writes, page by page.

    Page i (from 1 MiB) was incremented once per pass; with P passes done and
    the vCPU at page X, page i's byte 0 moved from A's stop to B's stop by
    ``(P_B - P_A) + [i < X_B] - [i < X_A]`` (mod 256); the page at X itself
    may be either side (the vCPU can stop between the load and the store).
    """
    a = src_dump.read_bytes()
    b = dst_dump.read_bytes()
    assert len(a) == len(b) == mem_bytes, (len(a), len(b), mem_bytes)
    low = a[:MiB] == b[:MiB]
    pa, pb = src_regs["R13"], dst_regs["R13"]
    xa = max(0, (src_regs["RAX"] - MiB) // 4096)
    xb = max(0, (dst_regs["RAX"] - MiB) // 4096)
    other: list[int] = []
    bad: list[int] = []
    sa, sb = a[MiB:], b[MiB:]
    ma, mb = bytearray(sa), bytearray(sb)
    zeros = bytes(len(ma[0::4096]))
    ma[0::4096] = zeros
    mb[0::4096] = zeros
    if ma != mb:
        other = [MiB + p for p in range(0, len(ma), 4096) if ma[p : p + 4096] != mb[p : p + 4096]]
    fa, fb = sa[0::4096], sb[0::4096]
    for i in range(len(fa)):
        got = (fb[i] - fa[i]) & 0xFF
        db = (0, 1) if i == xb else (int(i < xb),)
        da = (0, 1) if i == xa else (int(i < xa),)
        if got not in {(pb - pa + x - y) & 0xFF for x in db for y in da}:
            bad.append(MiB + i * 4096)
    return MemoryCheck(pages=len(fa), identical_low=low, other_bytes_mismatch=other[:20],
                       bad_counter_pages=bad[:20], src_passes=pa, dst_passes=pb)


@dataclass
class MigrationResult:
    total_ms: int
    downtime_ms: int
    setup_ms: int
    transferred: int
    wall_s: float
    src_letters: bytes
    dst_letters: bytes
    memory: MemoryCheck
    src_info: dict[str, Any]
    dst_info: dict[str, Any]

    @property
    def throughput_mib_s(self) -> float:
        return self.transferred / MiB / max(self.total_ms / 1000, 1e-9)


def reported_downtime_ms(info: dict[str, Any]) -> int:
    """query-migrate's ``downtime`` of a completed migration. QEMU 7.2 sets a postcopy run's at the
    switch in whole milliseconds; under 1 ms that is 0, which its completion takes for a precopy
    run and replaces with the clock minus a start it never set (milliseconds since boot, larger
    than ``total-time``): read that as 0."""
    downtime, total = int(info.get("downtime", 0)), int(info.get("total-time", 0))
    return 0 if downtime > total else downtime


# Precopy's rate before migrate-start-postcopy (64 MiB take 2 s): uncapped, QEMU once finished in
# precopy in 74 ms, before it handled migrate-start-postcopy, and a test of postcopy got a precopy
# migration (CI: device state outside a package). Postcopy runs at max-postcopy-bandwidth (0: none).
PRECOPY_CAP = 32 << 20
# QEMU 7.2 syncs its dirty bitmap only when what is left is under its convergence threshold, and
# that threshold is 0 until its first 100 ms rate window has been measured: a first pass that ends
# inside that window finds nothing left (0 < 0 is false, no sync) and completes in precopy. Capped
# at 32 MiB/s CI still saw it once: 30 ms, 9.45 MB (mostly zero pages), devices outside a package.
# So precopy starts slower, for a few windows, and only then runs at PRECOPY_CAP.
SLOW_START_CAP = 256 << 10      # 26 KB a window: even a RAM of zero pages takes > 5 windows
SLOW_START_S = 0.3


def start_postcopy_from_qemu(src: Qemu, uri: str, *, precopy_s: float = 0.0) -> None:
    """``migrate`` QEMU ``src`` to ``uri`` (capabilities already set): ``precopy_s`` of precopy at
    ``PRECOPY_CAP`` after a slow start (``SLOW_START_CAP`` for ``SLOW_START_S``), then
    ``migrate-start-postcopy``."""
    src.cmd("migrate-set-parameters", **{"downtime-limit": 1, "max-bandwidth": SLOW_START_CAP})
    src.cmd("migrate", uri=uri)
    if precopy_s:
        time.sleep(min(precopy_s, SLOW_START_S))
        src.cmd("migrate-set-parameters", **{"max-bandwidth": PRECOPY_CAP})
        time.sleep(max(precopy_s - SLOW_START_S, 0.0))
    src.cmd("migrate-start-postcopy")


def run_postcopy(src: Qemu, dst: Qemu, *, preempt: bool, passes_before: int = 1, precopy_s: float = 0.0,
                 timeout: float = 120.0) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Start ``src`` and ``dst`` (incoming), let the guest write ``passes_before`` whole passes,
    migrate with postcopy (after ``precopy_s`` of precopy) and wait until both completed: the two
    final query-migrate answers and the seconds from ``migrate`` to both completed."""
    caps = (*POSTCOPY_CAPS, "postcopy-preempt") if preempt else POSTCOPY_CAPS
    src.start()
    dst.start()
    src.wait_letters(passes_before, timeout)
    for vm in (src, dst):
        vm.set_capabilities(caps)
    port = free_port()
    dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
    t0 = time.monotonic()
    start_postcopy_from_qemu(src, f"tcp:127.0.0.1:{port}", precopy_s=precopy_s)
    src_info = src.wait_status({"completed"}, timeout)
    dst_info = dst.wait_status({"completed"}, timeout)
    return src_info, dst_info, time.monotonic() - t0


def migrate_qemu_to_qemu(rundir: Path, *, mem: str = "64M", preempt: bool = False, precopy_s: float = 0.0,
                         hugetlbfs: Path | None = None, passes_before: int = 2, passes_after: int = 1,
                         timeout: float = 120.0) -> MigrationResult:
    """A real QEMU -> QEMU postcopy migration of the boot guest, checked page by page."""
    src = Qemu("src", rundir, mem=mem, hugetlbfs=hugetlbfs)
    dst = Qemu("dst", rundir, mem=mem, hugetlbfs=hugetlbfs, incoming=True)
    try:
        src_info, dst_info, wall = run_postcopy(src, dst, preempt=preempt, passes_before=passes_before,
                                                precopy_s=precopy_s, timeout=timeout)
        src_letters = src.letters()
        dst.wait_letters(passes_after, timeout)
        dst.cmd("stop")
        # the source stopped itself at the switch; both are stopped now
        regs_a, regs_b = src.registers(), dst.registers()
        check = compare_guest_memory(src.dump_memory(rundir / "src.mem"), dst.dump_memory(rundir / "dst.mem"),
                                     regs_a, regs_b, src.mem_bytes)
        for f in ("src.mem", "dst.mem"):
            (rundir / f).unlink()
        return MigrationResult(
            total_ms=int(src_info.get("total-time", 0)), downtime_ms=reported_downtime_ms(src_info),
            setup_ms=int(src_info.get("setup-time", 0)),
            transferred=int(src_info.get("ram", {}).get("transferred", 0)), wall_s=wall,
            src_letters=src_letters, dst_letters=dst.letters(), memory=check, src_info=src_info,
            dst_info=dst_info)
    finally:
        dst.stop()
        src.stop()


# -- our own roles as processes, against real QEMU ------------------------------------------------


class PostcopyProcess:
    """``python -m postcopy ARGS`` of this checkout, with stdout/stderr in files; ended by PID."""

    def __init__(self, rundir: Path, name: str, args: list[str]) -> None:
        self.name = name
        self.out = rundir / f"{name}.out"
        self.err = rundir / f"{name}.err"
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "postcopy", *args], cwd=REPO, env=env,
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=err)

    def wait_line(self, prefix: str, timeout: float = 20.0) -> str:
        """The first stdout line starting with ``prefix`` (e.g. "listening on")."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.out.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode} before {prefix!r}: {self.stderr()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: no {prefix!r} line after {timeout} s: {self.stderr()}")
            time.sleep(0.01)

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} still running after {timeout} s: {self.stderr()}") from None

    def stderr(self) -> str:
        try:
            return self.err.read_text(errors="replace")[-3000:]
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _postcopy_dest(rundir: Path, save: Path, *, preempt: bool, link_timeout: float = 3.0,
                   qmp: Path | None = None, touch: str | None = None) -> tuple[PostcopyProcess, int]:
    """``postcopy dest --save`` listening on a free port: (process, port)."""
    args = ["dest", "--listen", "127.0.0.1:0", "--save", str(save), "--preempt" if preempt else "--no-preempt",
            "--link-timeout", str(link_timeout), "--progress", "none", "--json", str(rundir / "dest.json")]
    if qmp is not None:
        args += ["--qmp", str(qmp)]
    if touch is not None:
        args += ["--touch", touch]
    d = PostcopyProcess(rundir, "dest", args)
    line = d.wait_line("listening on")
    return d, int(line.rsplit(":", 1)[1])


@dataclass
class ToUsResult:
    """QEMU A -> ``postcopy dest --save``: A's figures, A's stopped state, the snapshot."""

    total_ms: int
    downtime_ms: int
    transferred: int
    wall_s: float
    src_info: dict[str, Any]
    src_letters: bytes
    src_regs: dict[str, int]
    src_dump: Path
    snapshot: Path
    report: dict[str, Any]
    paused_seen: bool = False

    @property
    def throughput_mib_s(self) -> float:
        return self.transferred / MiB / max(self.total_ms / 1000, 1e-9)


def migrate_qemu_to_us(rundir: Path, *, mem: str = "64M", preempt: bool = False, precopy_s: float = 0.0,
                       hugetlbfs: Path | None = None, pause_s: float = 0.0, passes_before: int = 2,
                       recover_new_port: bool = False, touch: str | None = None,
                       precopy_only: bool = False, never_ran: bool = False, timeout: float = 60.0) -> ToUsResult:
    """A real QEMU -> ``postcopy dest --save DIR`` (postcopy-ram, return-path, maybe preempt).

    ``pause_s``: during postcopy (capped at 32 MiB/s so it lasts), ``migrate-pause`` on A; the
    destination must report postcopy-paused (QMP); after ``pause_s`` A resumes (``migrate`` with
    ``resume: true`` to the same address). With ``recover_new_port`` the destination is told QMP
    ``migrate-recover`` to a new port first and A resumes to that one. ``touch``: the destination's
    ``--touch`` reader (page requests from RUN on). A stays stopped at the switch; its RAM is dumped.
    ``precopy_s``: precopy runs that long first (``start_postcopy_from_qemu``: capped, after a slow
    start, so that it cannot converge: the switch to postcopy is what is tested);
    ``precopy_only``: no migrate-start-postcopy, QEMU converges and completes in precopy.
    ``never_ran``: A starts stopped (``-S``), its guest never runs: RAM of zero pages (and firmware).
    """
    caps = (*POSTCOPY_CAPS, "postcopy-preempt") if preempt else POSTCOPY_CAPS
    save = rundir / "snapshot"
    a = Qemu("a", rundir, mem=mem, hugetlbfs=hugetlbfs, extra=["-S"] if never_ran else [])
    dqmp = Path(tempfile.mkdtemp(prefix="pcd-")) / "qmp.sock" if pause_s else None
    d: PostcopyProcess | None = None
    try:
        a.start()
        if not never_ran:
            a.wait_letters(passes_before, timeout)
        a.set_capabilities(caps)
        if pause_s:
            a.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 32 << 20})
        d, port = _postcopy_dest(rundir, save, preempt=preempt, qmp=dqmp, touch=touch)
        uri = f"tcp:127.0.0.1:{port}"
        t0 = time.monotonic()
        if precopy_only:
            a.cmd("migrate-set-parameters", **{"downtime-limit": 300, "max-bandwidth": 10 << 30})
            a.cmd("migrate", uri=uri)
        else:
            start_postcopy_from_qemu(a, uri, precopy_s=precopy_s)
        paused_seen = False
        if pause_s:
            assert dqmp is not None
            a.wait_status({"postcopy-active"}, timeout, peer=d)
            time.sleep(0.2)
            a.cmd("migrate-pause")
            a.wait_status({"postcopy-paused"}, timeout, peer=d)
            dq = QmpClient(str(dqmp))
            try:
                deadline = time.monotonic() + 5
                while not paused_seen and time.monotonic() < deadline:
                    paused_seen = dq.cmd("query-migrate").get("status") == "postcopy-paused"
                    time.sleep(0.02)
                time.sleep(pause_s)
                if recover_new_port:
                    uri = f"tcp:127.0.0.1:{free_port()}"
                    dq.cmd("migrate-recover", uri=uri)
            finally:
                dq.close()
            a.cmd("migrate", uri=uri, resume=True)
        info = a.wait_status({"completed"}, timeout, peer=d)
        wall = time.monotonic() - t0
        if dqmp is not None:
            dq = QmpClient(str(dqmp))       # the destination lingers for QMP quit once done
            try:
                deadline = time.monotonic() + timeout
                while dq.cmd("query-migrate").get("status") != "completed" and time.monotonic() < deadline:
                    time.sleep(0.02)
                while not (save / "manifest.json").exists() and time.monotonic() < deadline:
                    time.sleep(0.02)
                with contextlib.suppress(Exception):
                    dq.cmd("quit")
            finally:
                dq.close()
        rc = d.wait(timeout)
        if rc != 0:
            raise RuntimeError(f"postcopy dest exited {rc}: {d.stderr()}")
        regs = a.registers()
        dump = a.dump_memory(rundir / "a.mem")
        return ToUsResult(total_ms=int(info.get("total-time", 0)), downtime_ms=reported_downtime_ms(info),
                          transferred=int(info.get("ram", {}).get("transferred", 0)), wall_s=wall, src_info=info,
                          src_letters=a.letters(), src_regs=regs, src_dump=dump, snapshot=save,
                          report=json.loads((rundir / "dest.json").read_text()), paused_seen=paused_seen)
    finally:
        if d is not None:
            d.stop()
        a.stop()
        if dqmp is not None:
            shutil.rmtree(dqmp.parent, ignore_errors=True)


@dataclass
class RestoreResult:
    """``postcopy source --from-snapshot`` -> QEMU B."""

    run_s: float            # from starting the source until B runs the guest
    wall_s: float           # until B reports completed
    dst_info: dict[str, Any]
    dst_letters: bytes
    dst_regs: dict[str, int]
    dst_dump: Path
    source_report: dict[str, Any]
    paused_seen: bool = False       # B reported postcopy-paused after the cut


def restore_into_qemu(snapshot: Path, rundir: Path, *, mem: str = "64M", preempt: bool = False,
                      hugetlbfs: Path | None = None, passes_after: int = 1, bandwidth_cap: str = "0",
                      dump: bool = True, via_qmp: bool = False, pause_s: float = 0.0, cut: str = "qmp",
                      timeout: float = 60.0) -> RestoreResult:
    """Lazy restore: QEMU B ``-incoming`` (same machine arguments, postcopy capabilities) <- our source.

    ``via_qmp``: the source is started first with a QMP socket and driven as QEMU's would be
    (capabilities, ``migrate``, ``migrate-start-postcopy``); ``run_s`` then counts from ``migrate``
    (not from starting the process), as for QEMU's own restore.

    ``pause_s``: during postcopy (capped at 32 MiB/s so it lasts) the link to B is cut; B must report
    postcopy-paused; after ``pause_s`` B is told ``migrate-recover`` to a new port. ``cut="qmp"`` (with
    ``via_qmp``): ``migrate-pause`` on our source cuts it and ``migrate`` with ``resume: true`` to the new
    port resumes; ``cut="kill"``: ``ss -K`` kills the TCP connections and our source, started with
    ``--recover-connect`` the new port, resumes by itself.
    """
    caps = (*POSTCOPY_CAPS, "postcopy-preempt") if preempt else POSTCOPY_CAPS
    b = Qemu("b", rundir, mem=mem, hugetlbfs=hugetlbfs, incoming=True)
    paused_seen = False
    s: PostcopyProcess | None = None
    sq: QmpClient | None = None
    sockdir = Path(tempfile.mkdtemp(prefix="pcs-"))
    try:
        b.start()
        b.set_capabilities(caps)
        port = free_port()
        new_port = free_port()
        b.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        if pause_s and not via_qmp:
            bandwidth_cap = str(32 << 20)
        args = ["source", "--from-snapshot", str(snapshot), "--connect", f"127.0.0.1:{port}",
                "--preempt" if preempt else "--no-preempt", "--bandwidth-cap", bandwidth_cap,
                "--progress", "none", "--json", str(rundir / "source.json")]
        if pause_s:
            # the cut must land in postcopy: the bandwidth cap makes the bulk stream last, and
            # prefetch (uncapped, on the preempt channel) would carry the walking guest's pages ahead
            args += ["--no-prefetch"]
        if pause_s and cut == "kill":
            args += ["--recover-connect", f"127.0.0.1:{new_port}"]
        if via_qmp:
            s = PostcopyProcess(rundir, "source", [*args, "--qmp", str(sockdir / "qmp.sock")])
            s.wait_line("QMP control socket on")
            sq = QmpClient(str(sockdir / "qmp.sock"))
            sq.cmd("migrate-set-capabilities",
                   capabilities=[{"capability": c, "state": True} for c in caps])
            if pause_s:
                sq.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 32 << 20})
            t0 = time.monotonic()
            sq.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            sq.cmd("migrate-start-postcopy")
        else:
            t0 = time.monotonic()
            s = PostcopyProcess(rundir, "source", args)
        deadline = t0 + timeout
        while b.cmd("query-status").get("status") != "running":
            if s.proc.poll() is not None and s.proc.returncode != 0:
                raise RuntimeError(f"postcopy source exited {s.proc.returncode}: {s.stderr()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"b: not running after {timeout} s: {b.log()} {s.stderr()}")
            time.sleep(0.002)
        run_s = time.monotonic() - t0
        if pause_s:
            b.wait_status({"postcopy-active"}, timeout, peer=s)
            time.sleep(0.2)
            if cut == "qmp":
                assert sq is not None, "a pause by QMP needs via_qmp"
                sq.cmd("migrate-pause")
            else:
                kill_tcp(port)
            b.wait_status({"postcopy-paused"}, timeout, peer=s)
            paused_seen = True
            time.sleep(pause_s)
            b.cmd("migrate-recover", uri=f"tcp:127.0.0.1:{new_port}")
            if sq is not None:
                sq.cmd("migrate", uri=f"tcp:127.0.0.1:{new_port}", resume=True)
        info = b.wait_status({"completed"}, timeout, peer=s)
        wall = time.monotonic() - t0
        if sq is not None:
            while sq.cmd("query-migrate").get("status") != "completed" and time.monotonic() < deadline:
                time.sleep(0.01)
            with contextlib.suppress(Exception):
                sq.cmd("quit")
        rc = s.wait(timeout)
        if rc != 0:
            raise RuntimeError(f"postcopy source exited {rc}: {s.stderr()}")
        regs: dict[str, int] = {}
        path = rundir / "b.mem"
        if dump:
            b.wait_letters(passes_after, timeout)
            b.cmd("stop")
            regs = b.registers()
            b.dump_memory(path)
        return RestoreResult(run_s=run_s, wall_s=wall, dst_info=info, dst_letters=b.letters(), dst_regs=regs,
                             dst_dump=path, source_report=json.loads((rundir / "source.json").read_text()),
                             paused_seen=paused_seen)
    finally:
        if sq is not None:
            sq.close()
        if s is not None:
            s.stop()
        b.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


def qemu_file_restore(rundir: Path, *, mem: str = "1G", passes_before: int = 2,
                      timeout: float = 300.0) -> tuple[float, float]:
    """QEMU's own save and restore of a stopped VM: ``migrate`` to ``exec:cat > FILE``, then a new
    QEMU ``-incoming`` from ``exec:cat FILE``. Returns (save seconds, seconds from ``migrate-incoming``
    until the restored guest runs)."""
    image = rundir / "vm.state"
    a = Qemu("fa", rundir, mem=mem)
    try:
        a.start()
        a.wait_letters(passes_before, timeout)
        a.cmd("stop")
        a.cmd("migrate-set-parameters", **{"max-bandwidth": 10 << 30})
        t0 = time.monotonic()
        a.cmd("migrate", uri=f"exec:cat > {image}")
        a.wait_status({"completed"}, timeout)
        save_s = time.monotonic() - t0
    finally:
        a.stop()
    b = Qemu("fb", rundir, mem=mem, incoming=True)
    try:
        b.start()
        t0 = time.monotonic()
        b.cmd("migrate-incoming", uri=f"exec:cat {image}")
        deadline = t0 + timeout
        while (st := b.cmd("query-status").get("status")) != "running":
            if st == "paused" and b.status() == "completed":
                b.cmd("cont")       # it was saved stopped: loaded, now resume it (as virsh restore does)
            if time.monotonic() > deadline:
                raise TimeoutError(f"fb: not running after {timeout} s: {b.log()}")
            time.sleep(0.002)
        run_s = time.monotonic() - t0
        if not b.wait_letters(1, timeout):
            raise RuntimeError("fb: the restored guest printed nothing")
        return save_s, run_s
    finally:
        b.stop()
        image.unlink(missing_ok=True)
