"""The serving process: one C thread per VMM (``pc_hs_run``, GIL released).

It holds nothing that must survive it: the supervisor keeps every uffd and
every shared record, and starts a new server, handing them over again, when
this one dies. Run as ``python -m postcopy.handler._server --control-fd N
--mem-file FILE``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from postcopy.handler._control import recv_message, send_message
from postcopy.handler._mappings import Region
from postcopy.handler._shared import SharedState
from postcopy.handler._source import MemoryFileSource, PageSource
from uffd._lowlevel import ffi, lib

__all__ = ["Server", "main"]


@dataclass(slots=True)
class _Serving:
    session_id: int
    uffd: int
    shared: SharedState
    session: Any
    thread: threading.Thread | None = None
    stopping: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class Server:
    """Serves the sessions the supervisor hands over, from one page source."""

    def __init__(self, control: socket.socket, source: PageSource, *, fill: bool, crash_after_faults: int = 0) -> None:
        self._control = control
        self._source = source
        self._fill = fill
        self._crash_after_faults = crash_after_faults
        self._sessions: dict[int, _Serving] = {}
        self._send_lock = threading.Lock()

    def _send(self, message: dict[str, Any]) -> None:
        # the supervisor gone: nothing to report to
        with self._send_lock, contextlib.suppress(OSError):
            send_message(self._control, message)

    def _open(self, session_id: int, regions: list[Region], uffd: int, memfd: int, fresh: bool) -> _Serving:
        npages = sum(r.npages for r in regions)
        shared = SharedState(memfd, npages)
        c_regions = ffi.new("pc_hs_region[]", len(regions))
        bit = 0
        for i, r in enumerate(regions):
            c_regions[i] = (r.base_host_virt_addr, r.size, r.offset, r.page_size, bit)
            bit += r.npages
        src, src_len = self._source.mapping()
        err = ffi.new("int *")
        session = lib.pc_hs_open(uffd, c_regions, len(regions), src, src_len, shared.pointer, shared.size,
                                 int(fresh), int(self._fill), err)
        if session == ffi.NULL:
            shared.close()
            raise OSError(-err[0], f"pc_hs_open: {os.strerror(-err[0])}")
        if self._crash_after_faults:
            lib.pc_hs_set_crash_after_faults(session, self._crash_after_faults)
        return _Serving(session_id, uffd, shared, session)

    def _run(self, serving: _Serving, fresh: bool) -> None:
        rc = 0 if fresh else int(lib.pc_hs_wake_all(serving.session))
        if rc == 0:
            rc = int(lib.pc_hs_run(serving.session))
        serving.done.set()
        if not serving.stopping:
            self._send({"op": "ended", "id": serving.session_id, "rc": rc,
                        "error": os.strerror(-rc) if rc < 0 else None})

    def _serve(self, message: dict[str, Any], fds: list[int]) -> None:
        session_id = int(message["id"])
        uffd, memfd = fds
        regions = [Region(**r) for r in message["regions"]]
        fresh = bool(message["fresh"])
        try:
            serving = self._open(session_id, regions, uffd, memfd, fresh)
        except (OSError, ValueError) as exc:
            os.close(uffd)
            self._send({"op": "ended", "id": session_id, "rc": -(getattr(exc, "errno", None) or 22), "error": str(exc)})
            return
        self._sessions[session_id] = serving
        serving.thread = threading.Thread(target=self._run, args=(serving, fresh), name=f"vmm-{session_id}", daemon=True)
        serving.thread.start()

    def _stop(self, session_id: int, *, ack: bool = True) -> None:
        serving = self._sessions.pop(session_id, None)
        if serving is not None:
            self._close(serving)
        if ack:   # the shared record is final from now on
            self._send({"op": "stopped", "id": session_id})

    def _close(self, serving: _Serving) -> None:
        serving.stopping = True
        lib.pc_hs_stop(serving.session)
        if serving.thread is not None:
            serving.thread.join()
        lib.pc_hs_close(serving.session)
        serving.shared.close()
        os.close(serving.uffd)

    def run(self) -> int:
        self._send({"op": "ready", "pid": os.getpid()})
        while True:
            got = recv_message(self._control)
            if got is None:
                break
            message, fds = got
            if message.get("op") == "serve" and len(fds) == 2:
                self._serve(message, fds)
            elif message.get("op") == "stop":
                self._stop(int(message["id"]))
            else:
                for fd in fds:
                    os.close(fd)
        for session_id in list(self._sessions):
            self._stop(session_id, ack=False)
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="postcopy-handler-server")
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--mem-file", required=True)
    p.add_argument("--fill", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--crash-after-faults", type=int, default=0)
    args = p.parse_args(argv)
    control = socket.socket(fileno=args.control_fd)
    source = MemoryFileSource(args.mem_file)
    try:
        return Server(control, source, fill=args.fill, crash_after_faults=args.crash_after_faults).run()
    finally:
        source.close()


if __name__ == "__main__":
    sys.exit(main())
