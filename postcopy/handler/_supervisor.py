"""The process that owns what must survive a crash: the listening socket, every
VMM's connection and userfaultfd, and every VMM's shared record of placed
pages. It speaks the handshake (Python: a message per VMM) and runs the
serving process (C threads), restarting it whenever it dies."""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import postcopy
from postcopy.handler._control import recv_message, send_message
from postcopy.handler._mappings import MAX_HANDSHAKE_BYTES, HandshakeError, Region, parse_handshake
from postcopy.handler._report import SessionView, session_report
from postcopy.handler._shared import SharedState, StateSnapshot
from postcopy.handler._socket import listen_unix

__all__ = ["Supervisor", "SupervisorOptions", "install_signal_handlers"]

_UCRED = struct.Struct("3i")
_MAX_FDS = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class SupervisorOptions:
    socket_path: str
    mem_file: str
    fill: bool = True
    crash_after_faults: int = 0
    """Test hook: the first serving process kills itself after reading this many faults of one VMM."""
    on_event: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    on_change: Callable[[], None] = lambda: None
    """Called after a VMM session starts or ends (e.g. to rewrite the report)."""


@dataclass(slots=True)
class _Session:
    session_id: int
    conn: socket.socket
    pid: int
    uid: int
    gid: int
    regions: tuple[Region, ...]
    uffd: int
    shared: SharedState | None
    started_at: float = field(default_factory=time.time)
    end_reason: str | None = None
    final: StateSnapshot | None = None

    def view(self) -> SessionView:
        snap = self.final if self.final is not None else self.shared.snapshot()  # type: ignore[union-attr]
        return SessionView(self.session_id, self.pid, self.uid, self.gid, self.regions, self.started_at,
                           self.end_reason, snap)


class Supervisor:
    """Accepts VMMs on a Unix socket and keeps a serving process running for them."""

    def __init__(self, options: SupervisorOptions) -> None:
        self.options = options
        self.file_size = os.stat(options.mem_file).st_size
        if self.file_size == 0:
            raise ValueError(f"memory file {options.mem_file} is empty")
        self.handshakes: dict[str, int] = {}
        self.session_ends: dict[str, int] = {}
        self.server_restarts = 0
        self.server_pid: int | None = None
        self._lock = threading.Lock()     # sessions vs. the metrics thread
        self._sessions: dict[int, _Session] = {}
        self._closing: dict[int, _Session] = {}   # ended, the server not yet done with its record
        self._ended: list[_Session] = []
        self._pending: dict[int, socket.socket] = {}   # connected, no handshake yet
        self._next_id = 1
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._server: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._pidfd = -1
        self._generation = 0
        self._stop = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # ---- views for metrics and the report ----

    def views(self) -> list[SessionView]:
        with self._lock:
            return [s.view() for s in (*self._ended, *self._closing.values(), *self._sessions.values())]

    def report(self) -> dict[str, Any]:
        vmms = sorted((session_report(v) for v in self.views()), key=lambda r: int(r["id"]))
        return {"role": "uffd-handler", "mem_file": self.options.mem_file, "socket": self.options.socket_path,
                "server_restarts": self.server_restarts, "handshakes": dict(self.handshakes),
                "session_ends": dict(self.session_ends), "vmms": vmms}

    def _say(self, line: str) -> None:
        self.options.on_event(f"uffd-handler: {line}")

    # ---- the serving process ----

    def _spawn_server(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._generation += 1
        cmd = [sys.executable, "-m", "postcopy.handler._server", "--control-fd", str(theirs.fileno()),
               "--mem-file", self.options.mem_file, "--fill" if self.options.fill else "--no-fill"]
        if self.options.crash_after_faults and self._generation == 1:
            cmd += ["--crash-after-faults", str(self.options.crash_after_faults)]
        env = dict(os.environ)
        root = str(Path(postcopy.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._server = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        self.server_pid = self._server.pid
        self._control = ours
        self._pidfd = os.pidfd_open(self._server.pid)
        self._sel.register(ours, selectors.EVENT_READ, self._on_control)
        self._sel.register(self._pidfd, selectors.EVENT_READ, self._on_server_exit)

    def _hand_over(self, session: _Session, *, fresh: bool) -> None:
        assert self._control is not None
        assert session.shared is not None
        message = {"op": "serve", "id": session.session_id, "fresh": fresh,
                   "regions": [r.as_json() for r in session.regions]}
        try:
            send_message(self._control, message, [session.uffd, session.shared.fd])
        except OSError as exc:
            self._say(f"cannot hand VMM {session.session_id} to the server: {exc} (handed over again on restart)")

    def _on_server_exit(self, _key: Any) -> None:
        assert self._server is not None
        rc = self._server.wait()
        self._sel.unregister(self._pidfd)
        os.close(self._pidfd)
        if self._control is not None:
            self._sel.unregister(self._control)
            self._control.close()
            self._control = None
        for closing in list(self._closing.values()):
            self._finalize(closing)   # nobody writes their records any more
        if self._stop:
            return
        how = f"signal {-rc}" if rc < 0 else f"status {rc}"
        self.server_restarts += 1
        self._say(f"serving process {self._server.pid} died ({how}); restarting it with {len(self._sessions)} VMM(s)")
        self._spawn_server()
        for session in self._sessions.values():
            self._hand_over(session, fresh=False)

    def _on_control(self, _key: Any) -> None:
        assert self._control is not None
        try:
            got = recv_message(self._control)
        except (OSError, ValueError):
            got = None
        if got is None:
            return  # the server is exiting; its pidfd reports it
        message, fds = got
        for fd in fds:
            os.close(fd)
        if message.get("op") == "ready":
            self._say(f"serving process {message.get('pid')} ready")
        elif message.get("op") == "stopped":
            closing = self._closing.get(int(message["id"]))
            if closing is not None:
                self._finalize(closing)
        elif message.get("op") == "ended":
            session = self._sessions.get(int(message["id"]))
            if session is not None:
                rc = int(message.get("rc", 0))
                reason = "vmm_gone" if rc == -errno.ESRCH else "error"
                self._say(f"VMM {session.session_id} (pid {session.pid}): serving stopped: {message.get('error')}")
                self._end(session, reason)

    # ---- VMM connections ----

    def _on_accept(self, _key: Any) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        self._pending[conn.fileno()] = conn
        self._sel.register(conn, selectors.EVENT_READ, self._on_handshake)

    def _reject(self, conn: socket.socket, kind: str, message: str, pid: int) -> None:
        self.handshakes[kind] = self.handshakes.get(kind, 0) + 1
        self._say(f"rejected VMM pid {pid}: {message}")
        with contextlib.suppress(OSError):
            conn.send(f'{{"error": {_json_str(message)}}}\n'.encode())
        conn.close()

    def _on_handshake(self, key: Any) -> None:
        conn: socket.socket = key.fileobj
        self._sel.unregister(conn)
        self._pending.pop(conn.fileno(), None)
        pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        try:
            data, fds, flags, _ = socket.recv_fds(conn, MAX_HANDSHAKE_BYTES + 1, _MAX_FDS)
        except BlockingIOError:
            self._pending[conn.fileno()] = conn
            self._sel.register(conn, selectors.EVENT_READ, self._on_handshake)
            return
        except OSError as exc:
            self._reject(conn, "closed", f"reading the handshake: {exc}", pid)
            return
        try:
            if not data and not fds:
                raise HandshakeError("closed", "the peer closed the connection before its handshake")
            if flags & socket.MSG_CTRUNC:
                raise HandshakeError("extra_fds", f"the handshake carried more than {_MAX_FDS} file descriptors")
            regions = parse_handshake(data, len(fds), self.file_size)
            if _fd_kind(fds[0]) != "anon_inode:[userfaultfd]":
                raise HandshakeError("not_uffd", f"the descriptor sent is {_fd_kind(fds[0])}, not a userfaultfd")
        except HandshakeError as exc:
            for fd in fds:
                os.close(fd)
            self._reject(conn, exc.kind, str(exc), pid)
            return
        self.handshakes["ok"] = self.handshakes.get("ok", 0) + 1
        session_id = self._next_id
        self._next_id += 1
        npages = sum(r.npages for r in regions)
        shared = SharedState.create(f"postcopy-handler-vmm-{session_id}", npages)
        session = _Session(session_id, conn, pid, uid, gid, regions, fds[0], shared)
        with self._lock:
            self._sessions[session_id] = session
        self._sel.register(conn, selectors.EVENT_READ, self._on_vmm_readable)
        total = sum(r.size for r in regions)
        self._say(f"VMM {session_id}: pid {pid} uid {uid}, {len(regions)} region(s), {total} bytes, "
                  f"page size {sorted({r.page_size for r in regions})}")
        if self._control is not None:
            self._hand_over(session, fresh=True)
        self.options.on_change()

    def _on_vmm_readable(self, key: Any) -> None:
        conn: socket.socket = key.fileobj
        session = next((s for s in self._sessions.values() if s.conn is conn), None)
        if session is None:
            return
        try:
            data, fds, _, _ = socket.recv_fds(conn, 4096, _MAX_FDS)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        for fd in fds:
            os.close(fd)
        if not data and not fds:
            self._say(f"VMM {session.session_id} (pid {session.pid}) closed its connection")
            self._end(session, "vmm_closed")
            return
        message = f"unexpected second message on the connection ({len(data)} bytes): the handshake is one message"
        self._say(f"VMM {session.session_id} (pid {session.pid}): {message}; closing it")
        with contextlib.suppress(OSError):
            conn.send(f'{{"error": {_json_str(message)}}}\n'.encode())
        self._end(session, "extra_message")

    def _end(self, session: _Session, reason: str) -> None:
        """Stop serving a VMM; its record is final once the server says "stopped" (or dies)."""
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(session.conn)
        session.conn.close()
        with self._lock:
            self._sessions.pop(session.session_id, None)
            session.end_reason = reason
            self._closing[session.session_id] = session
        self.session_ends[reason] = self.session_ends.get(reason, 0) + 1
        sent = False
        if self._control is not None:
            with contextlib.suppress(OSError):
                send_message(self._control, {"op": "stop", "id": session.session_id})
                sent = True
        if not sent:
            self._finalize(session)

    def _finalize(self, session: _Session) -> None:
        with self._lock:
            self._closing.pop(session.session_id, None)
            if session.shared is not None:
                session.final = session.shared.snapshot()
                session.shared.close()
                session.shared = None
            self._ended.append(session)
        os.close(session.uffd)
        self.options.on_change()

    # ---- the loop ----

    def request_stop(self) -> None:
        """From any thread or a signal handler: make :meth:`run` return."""
        self._stop = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    @property
    def wakeup_fd(self) -> int:
        """A non-blocking descriptor that wakes :meth:`run`'s loop when written (signal.set_wakeup_fd)."""
        return self._wake_w.fileno()

    def _stopped(self) -> bool:
        """Read anew: a handler just called may have set it (mypy would assume it unchanged)."""
        return self._stop

    def run(self, on_ready: Callable[[Supervisor], None] | None = None) -> None:
        path = Path(self.options.socket_path)
        self._listener = listen_unix(path, 64)
        self._listener.setblocking(False)
        self._sel.register(self._listener, selectors.EVENT_READ, self._on_accept)
        self._sel.register(self._wake_r, selectors.EVENT_READ, lambda _k: self._wake_r.recv(64))
        self._spawn_server()
        self._say(f"listening on {path}, serving {self.options.mem_file} ({self.file_size} bytes), "
                  f"serving process {self.server_pid}")
        if on_ready is not None:
            on_ready(self)
        try:
            while not self._stop:
                for key, _ in self._sel.select():
                    key.data(key)
                    if self._stopped():
                        break
        finally:
            self._shutdown(path)

    def _shutdown(self, path: Path) -> None:
        self._stop = True
        for session in list(self._sessions.values()):
            self._end(session, "shutdown")
        for conn in self._pending.values():
            conn.close()
        if self._control is not None:
            self._control.close()   # the server sees EOF, stops every thread and exits
            self._control = None
        if self._server is not None:
            try:
                self._server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._server.kill()
                self._server.wait()
        for closing in list(self._closing.values()):
            self._finalize(closing)
        if self._pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
        if self._listener is not None:
            self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._sel.close()
        self._release_wakeup_fd()
        self._wake_r.close()
        self._wake_w.close()

    def _release_wakeup_fd(self) -> None:
        """Unset the signal wakeup fd if it is ours: its number may be reused once closed."""
        if threading.current_thread() is not threading.main_thread():
            return      # only the main thread can set it, so it is not ours
        previous = signal.set_wakeup_fd(-1)
        if previous != self._wake_w.fileno():
            signal.set_wakeup_fd(previous)


def _fd_kind(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        return f"unknown ({exc.strerror})"


def _json_str(text: str) -> str:
    import json

    return json.dumps(text)


def install_signal_handlers(supervisor: Supervisor) -> None:
    """SIGTERM and SIGINT stop the supervisor, whichever of its threads the kernel hands them to.

    Python runs a handler in the main thread, and only when that thread runs bytecode; a
    signal delivered to another thread (the metrics server's) would leave the main thread
    asleep in select() with the stop unseen. The wakeup fd is written from the C-level
    handler in whatever thread took the signal, so the select returns and the handler runs.
    """
    signal.set_wakeup_fd(supervisor.wakeup_fd, warn_on_full_buffer=False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _s, _f: supervisor.request_stop())
