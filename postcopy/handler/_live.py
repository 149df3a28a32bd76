"""Live postcopy into any VMM: ``postcopy uffd-handler --socket PATH --listen HOST:PORT``.

One VMM connects to the Unix socket with Firecracker's handshake (its regions
and its userfaultfd); then a postcopy stream (``postcopy source --mem-file
FILE``: one RAM block the size of the memory file) is accepted on ``--listen``
and goes straight into the VMM's memory. The destination role runs unchanged
(:class:`postcopy.service.DestinationService`: channels, preempt, recovery,
QMP, metrics) on a :class:`postcopy.owner.RemoteMemory`: its C data path
places every page with ``UFFDIO_COPY`` through the VMM's userfaultfd at the
address of the region that maps it, and its fault service reads the VMM's
faults (-> page requests on the return path) and ``UFFD_EVENT_REMOVE`` (the
range reads zeros from then on). Nothing of the VMM's memory is mapped here.

When the migration completes every region is unregistered from the uffd (the
VMM then runs on its own memory) and the VMM's connection is closed.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postcopy.handler._mappings import MAX_HANDSHAKE_BYTES, HandshakeError, Region, parse_handshake
from postcopy.handler._socket import listen_unix
from postcopy.owner import RemoteMemory
from postcopy.session import MigrationFailed, MigrationStats
from postcopy.spec import BlockSpec, GuestSpec

__all__ = ["LiveOptions", "Vmm", "accept_vmm", "run_live"]

_UCRED = struct.Struct("3i")
_ANY_FILE = 1 << 64     # the stream's block size is checked when its RAM setup arrives


@dataclass(slots=True)
class Vmm:
    """One VMM after its handshake: its connection (kept open), its uffd and regions."""

    conn: socket.socket
    uffd: int
    regions: tuple[Region, ...]
    pid: int
    uid: int
    gid: int

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        with contextlib.suppress(OSError):
            os.close(self.uffd)


def _fd_kind(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        return f"unknown ({exc.strerror})"


def accept_vmm(listener: socket.socket, say: Callable[[str], None], stop: threading.Event) -> Vmm | None:
    """Wait for a VMM with a valid handshake (rejected ones get ``{"error": ...}`` and
    the next is awaited); None when ``stop`` is set first."""
    while not stop.is_set():
        ready, _, _ = select.select([listener], [], [], 0.2)
        if not ready:
            continue
        conn, _ = listener.accept()
        pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        fds: list[int] = []
        try:
            conn.settimeout(10)
            data, fds, flags, _ = socket.recv_fds(conn, MAX_HANDSHAKE_BYTES + 1, 8)
            if not data and not fds:
                raise HandshakeError("closed", "the peer closed the connection before its handshake")
            if flags & socket.MSG_CTRUNC:
                raise HandshakeError("extra_fds", "the handshake carried more than 8 file descriptors")
            regions = parse_handshake(data, len(fds), _ANY_FILE)
            if _fd_kind(fds[0]) != "anon_inode:[userfaultfd]":
                raise HandshakeError("not_uffd", f"the descriptor sent is {_fd_kind(fds[0])}, not a userfaultfd")
            if len({r.page_size for r in regions}) != 1:
                raise HandshakeError("bad_regions", "regions of several page sizes: live mode streams one RAM block "
                                                    "with one page size")
        except (HandshakeError, OSError) as exc:
            for fd in fds:
                os.close(fd)
            say(f"rejected VMM pid {pid}: {exc}")
            with contextlib.suppress(OSError):
                conn.sendall(b'{"error": %s}\n' % _json(str(exc)))
            conn.close()
            continue
        conn.settimeout(None)
        import fcntl

        flags_now = fcntl.fcntl(fds[0], fcntl.F_GETFL)
        fcntl.fcntl(fds[0], fcntl.F_SETFL, flags_now | os.O_NONBLOCK)   # the fault service reads it in batches
        return Vmm(conn, fds[0], regions, pid, uid, gid)
    return None


def _json(text: str) -> bytes:
    import json

    return json.dumps(text).encode()


def drain_events(uffd: int, seconds: float) -> int:
    """Read and drop whatever the uffd still reports for ``seconds`` (after every
    region was unregistered: a REMOVE queued just before must not block the VMM)."""
    n = 0
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([uffd], [], [], left)
        if not ready:
            break
        try:
            n += len(os.read(uffd, 32 * 64)) // 32
        except BlockingIOError:
            continue
        except OSError:
            break
    return n


@dataclass(frozen=True, slots=True, kw_only=True)
class LiveOptions:
    socket_path: str
    listen: tuple[str, int]
    preempt: bool = True
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    qmp: str | None = None
    linger: float = 0.0
    link_timeout: float | None = None
    on_event: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    on_ready: Callable[[Any], None] | None = None
    """Called with the DestinationService once its endpoints listen (metrics, QMP)."""


def _report(vmm: Vmm, result: MigrationStats | None, service: Any, error: BaseException | None,
            handed_back: bool) -> dict[str, Any]:
    from postcopy.commands.common import percentiles_us

    out: dict[str, Any] = {
        "role": "uffd-handler", "mode": "live",
        "vmm": {"pid": vmm.pid, "uid": vmm.uid, "gid": vmm.gid, "regions": [r.as_json() for r in vmm.regions]},
        "handed_back": handed_back,
        "error": None if error is None else f"{getattr(error, 'kind', type(error).__name__)}: {error}",
    }
    if result is not None:
        dest = service.destination
        out["migration"] = {
            "status": result.status.value,
            "recoveries": result.recoveries,
            "paused_seconds": round(result.paused_ns / 1e9, 4),
            "pages": {"received": result.pages_received, "total": result.pages_total},
            "remote_faults": result.remote_faults,
            "requests_sent": result.requests_sent,
            "duplicate_host_pages": result.duplicate_host_pages,
            "bytes": result.bytes,
            "main": {"normal_pages": result.main.normal_pages, "zero_pages": result.main.zero_pages},
            "preempt": {"normal_pages": result.preempt.normal_pages, "zero_pages": result.preempt.zero_pages},
            "fault_latency_us": percentiles_us(dest.latencies_ns) if dest is not None else {},
            "latency_histogram": service.latency_histogram.to_json(),
            "total_seconds": round((result.finished_ns - result.started_ns) / 1e9, 6) if result.finished_ns else None,
        }
        if dest is not None and dest._path is not None:
            c = dest._path.counters()
            out["migration"]["vmm_events"] = {"removes": c.removes, "removed_pages": c.removed_pages,
                                              "zero_faults": c.zero_faults,
                                              "unmapped_host_pages": c.unmapped_host_pages}
    return out


def run_live(options: LiveOptions, write_report: Callable[[dict[str, Any]], None]) -> int:
    """Serve one VMM from one live stream; 0 when the migration completed."""
    from postcopy.service import DestinationService, ServiceError, ServiceOptions

    say = options.on_event
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _s, _f: stop.set())
    path = Path(options.socket_path)
    listener = listen_unix(path, 8)
    say(f"uffd-handler: live mode: waiting for a VMM on {path}, then the stream on "
        f"{options.listen[0]}:{options.listen[1]}")
    try:
        vmm = accept_vmm(listener, say, stop)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if vmm is None:
        say("uffd-handler: stopped before a VMM came")
        return 0
    total = sum(r.size for r in vmm.regions)
    page_size = vmm.regions[0].page_size
    say(f"uffd-handler: VMM pid {vmm.pid} uid {vmm.uid}: {len(vmm.regions)} region(s), {total} bytes, pages of "
        f"{page_size}; accepting the stream")
    owner = RemoteMemory(vmm.uffd, [(r.base_host_virt_addr, r.size, r.offset, r.page_size) for r in vmm.regions])
    spec = GuestSpec(blocks=(BlockSpec("mem", owner.span, page_size),), vcpus=0)
    service_options = ServiceOptions(metrics_port=options.metrics_port, metrics_addr=options.metrics_addr,
                                     qmp=options.qmp, linger=options.linger, on_ready=options.on_ready)
    result: MigrationStats | None = None
    error: BaseException | None = None
    handed_back = False
    try:
        service: DestinationService[int] = DestinationService(
            spec, preempt=options.preempt, listen=options.listen, options=service_options, owner=lambda: owner,
            on_listening=lambda a: say(f"uffd-handler: listening for the stream on {a[0]}:{a[1]}"))
    except ServiceError as exc:
        vmm.close()
        raise OSError(str(exc)) from None
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)      # from now on a signal ends us: closing the uffd releases the VMM
    try:
        outcome = service.run()
        result = outcome.result if isinstance(outcome.result, MigrationStats) else None
        error = outcome.error
        if error is None and result is not None and result.error is None:
            owner.hand_back()
            handed_back = True
            dropped = drain_events(vmm.uffd, 0.2)
            say(f"uffd-handler: migration completed; VMM pid {vmm.pid} runs on its own memory now"
                + (f" ({dropped} late event(s) dropped)" if dropped else ""))
    finally:
        write_report(_report(vmm, result, service, error, handed_back))
        if service.destination is not None and not service.worker_running:
            service.destination.close()
        vmm.close()
    if error is not None:
        kind = error.kind if isinstance(error, MigrationFailed) else type(error).__name__
        say(f"uffd-handler: migration failed ({kind}): {error}")
        return 1
    return 0
