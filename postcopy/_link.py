"""Socket settings both roles need: a dead peer noticed in time, the fault path first."""

from __future__ import annotations

import contextlib
import gc
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from uffd._native import lib

__all__ = [
    "BACKGROUND_NICE",
    "SWITCH_NICE",
    "background_priority",
    "bound_bulk_buffers",
    "close_after_peer",
    "hold_gc",
    "name_os_thread",
    "one_malloc_arena",
    "quick_gil_handoff",
    "set_recv_timeout",
    "set_thread_nice",
    "shutdown_quietly",
    "thread_nice",
    "tune",
    "urgent_priority",
]


def tune(sock: socket.socket, link_timeout: float) -> socket.socket:
    """No Nagle (a page request is one small write), and a dead peer noticed
    within about ``link_timeout`` even while idle (keepalive) or while
    unacknowledged data waits (TCP_USER_TIMEOUT)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    probe = max(1, int(link_timeout / 3))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, probe)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, probe)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(link_timeout * 1000))
    return sock


def one_malloc_arena() -> None:
    """One malloc arena for the whole process (glibc), made before the roles' threads: a thread's
    own arena is fresh memory first touched inside the switch (see pc_malloc_one_arena)."""
    lib.pc_malloc_one_arena()


def urgent_priority(nice: int = lib.PC_URGENT_NICE) -> None:
    """Raise the calling thread above the guest and the bulk stream: it serves
    page faults. Needs CAP_SYS_NICE; without it the thread keeps its priority."""
    lib.pc_thread_set_nice(nice)


#: The nice of the destination's thread that starts the guest at RUN, from the vCPUs' release
#: until PONG 3 is written: above the fault path (PC_URGENT_NICE). The vCPUs' first accesses fault
#: at once, and the threads that serve them (the fault service, the preempt receiver, the source's
#: return path) would share a small host's CPUs with it at the same nice: 2 MiB pages served
#: meanwhile stretched the release past 0.4 ms in 6 of 200 idle 2M migrations (to 3.7 ms, downtime
#: to 4.5 ms), in 3 of 200 at -15 (to 1.0 ms, downtime at most 1.4 ms). Without CAP_SYS_NICE the
#: thread keeps its nice.
SWITCH_NICE: int = lib.PC_URGENT_NICE - 5


#: How much of its stack a thread on the fault path writes when it starts (below its depth then):
#: the traced loops reached 3 pages below their wait; each byte is memory beyond the guest.
FAULT_PATH_STACK_BYTES: int = 32 << 10


def touch_stack(nbytes: int = FAULT_PATH_STACK_BYTES) -> None:
    """Write the next ``nbytes`` of the calling thread's stack now, in C: a thread that waits
    for the switch (the fault service, the receivers, the source's return path) then runs its
    loops on stack pages it already has; a first touch there cost up to 270 us inside the
    downtime on a VM whose host backs memory lazily."""
    lib.pc_thread_touch_stack(nbytes)


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` where the OS shows threads (ps -L, top -H, ftrace):
    Python's thread names stay inside Python. The kernel keeps the first 15 bytes."""
    lib.pc_thread_set_name(name.encode("utf-8", "replace"))     # cut to 15 bytes in C


def thread_nice() -> int:
    """The calling thread's nice value (Linux: PRIO_PROCESS 0 is the thread)."""
    return os.getpriority(os.PRIO_PROCESS, 0)


def set_thread_nice(nice: int) -> None:
    """Back to ``nice`` (from :func:`thread_nice`), in C with the GIL released."""
    lib.pc_thread_set_nice(nice)


#: The nice value of threads that move bulk pages (below the guest and the fault path).
BACKGROUND_NICE = 10


def background_priority(nice: int = BACKGROUND_NICE) -> None:
    """Lower the calling thread (Linux: PRIO_PROCESS 0 is the thread) below
    the fault path: on 2 cores the bulk stream must not delay an urgent page.
    The call is C with the GIL released: a thread lowered while holding the GIL
    would be preempted at once and stall every Python thread of the process."""
    lib.pc_thread_set_nice(nice)


class _CountedSetting:
    """A process-wide setting for the guest's critical path, held by counted users (both roles
    may run in one process): the first one in applies it, the last one out restores it."""

    def __init__(self, apply: Callable[[], Any], restore: Callable[[Any], object], doc: str) -> None:
        self._apply, self._restore = apply, restore
        self._lock = threading.Lock()
        self._users = 0
        self._saved: Any = None
        self.__doc__ = doc

    def __call__(self, on: bool) -> None:
        with self._lock:
            if on:
                if self._users == 0:
                    self._saved = self._apply()
                self._users += 1
            elif self._users > 0:
                self._users -= 1
                if self._users == 0:
                    self._restore(self._saved)


#: The GIL switch interval while a thread of this process is on the guest's critical path.
QUICK_SWITCH_INTERVAL = 0.0002


def _quick_switch() -> float:
    saved = sys.getswitchinterval()
    sys.setswitchinterval(min(saved, QUICK_SWITCH_INTERVAL))
    return saved


quick_gil_handoff = _CountedSetting(_quick_switch, sys.setswitchinterval, doc="""\
Between ``quick_gil_handoff(True)`` and its ``(False)``, a thread that wants the GIL
back waits at most QUICK_SWITCH_INTERVAL for a thread running Python (default 5 ms): the
destination's switch (discards, PACKAGED, PONG 3) hands the GIL back and forth with
whatever else runs Python in the process.""")


def _gc_off() -> bool:
    enabled = gc.isenabled()
    gc.disable()
    return enabled


def _gc_back(enabled: bool) -> None:
    if enabled:
        gc.enable()


hold_gc = _CountedSetting(_gc_off, _gc_back, doc="""\
Between ``hold_gc(True)`` and its ``(False)`` the interpreter collects no garbage on its own:
the switch allocates enough objects to start a collection there, and one inside the downtime
cost 0.4-0.7 ms of it (bench runs on 2 busy CPUs). Held from the guest's stop to PONG 3 on the
source and from the switch's first command to RUN on the destination: milliseconds (seconds at
most, when a precopy's drain sends its discards while the guest still runs), so little piles up.""")


#: Bytes the bulk stream may have in flight in the kernel on each side. A page
#: that the stream already carries waits behind this much (about 0.5 ms at
#: 2 GB/s); the default autotuning lets it grow to tens of MiB.
BULK_SOCKET_BUFFER = 1 << 20
#: ... and at least this many of the guest's largest host pages: with 2 MiB pages a 1 MiB
#: buffer holds half a page, and the sender and the receiver took turns inside every page
#: (idle 2 MiB bulk 2.21 -> 2.65 GB/s with 4 MiB, busy 0.27 -> 0.33, 2 MiB fault p50 1.10 ->
#: 1.04 ms, 8 interleaved rounds each; with 4 KiB pages 4 MiB made the fault p99 worse).
BULK_HOST_PAGES_IN_FLIGHT = 2
#: ... up to this (1 GiB pages: no buffer holds two of them)
BULK_SOCKET_BUFFER_MAX = 64 << 20


_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def bound_bulk_buffers(sock: socket.socket, host_page_size: int = 4096) -> socket.socket:
    """Both kernel buffers of a bulk channel at their size. SO_SNDBUF/SO_RCVBUF stop at
    net.core.wmem_max/rmem_max (208 KiB on a default host, too little for a 2 MiB page or a
    fast link's round trip): with CAP_NET_ADMIN the FORCE options set it whatever those say."""
    size = min(max(BULK_SOCKET_BUFFER, BULK_HOST_PAGES_IN_FLIGHT * host_page_size), BULK_SOCKET_BUFFER_MAX)
    for force, plain in ((_SO_SNDBUFFORCE, socket.SO_SNDBUF), (_SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
    return sock


def set_recv_timeout(sock: socket.socket, seconds: float) -> None:
    """SO_RCVTIMEO on the fd, so the C readers' recv() gives up too (0 = never)."""
    sec = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", sec, int((seconds - sec) * 1e6)))


def close_after_peer(socks: list[socket.socket], timeout: float) -> None:
    """End our side of each connection (FIN) and read, discarding, until the peer has
    closed its side too, at most ``timeout`` seconds in all. A close with bytes still
    unread, or with the peer still writing, resets the connection: QEMU writes its
    VMDESCRIPTION after a precopy EOF while it reads our SHUT, and fails a migration
    whose last write fails."""
    deadline = time.monotonic() + timeout
    open_ = []
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            open_.append(sock)
    while open_:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            ready, _, _ = select.select(open_, [], [], left)
        except (OSError, ValueError):   # closed meanwhile
            return
        for sock in ready:
            try:
                data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue        # its reader thread took the bytes
            except OSError:
                data = b""
            if not data:
                open_.remove(sock)


def shutdown_quietly(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
