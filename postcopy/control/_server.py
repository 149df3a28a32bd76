"""A QMP-compatible control socket on asyncio (unix path or TCP host:port).

It speaks what QEMU 7.2's monitor speaks, checked against a real one: the
greeting offering ``oob``; capabilities negotiation first (anything else is
refused with CommandNotFound until then); ``execute`` / ``exec-oob`` with an
optional ``id`` that is echoed; in-band commands run one at a time in arrival
order, out-of-band ones (migrate-pause, migrate-recover) at once; events go to
every negotiated client.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import secrets
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Final

from postcopy.control._args import Enum, Field, ListOf, Struct, validate
from postcopy.control._errors import CommandNotFound, QMPError
from postcopy.control._state import CAPABILITIES, MigrationControl, QmpEvent

_UNIX_BACKLOG: Final = 16   # orchestrators and operators: a few clients at once

__all__ = ["MAX_MESSAGE_BYTES", "QEMU_VERSION", "QMPServer"]

log = logging.getLogger(__name__)

# The QEMU release whose QMP dialect we speak (greeting "version.qemu").
QEMU_VERSION: Final = (7, 2, 0)
# No command of ours needs more; QEMU allows 64 MiB tokens, we have no such input.
MAX_MESSAGE_BYTES: Final = 1 << 20
# QEMU's QMP_REQ_QUEUE_LEN_MAX: in-band commands queued before reading stops.
_QUEUE_LEN: Final = 8
# A client that does not read its events is dropped past this much unsent output.
_MAX_UNSENT_BYTES: Final = 1 << 20
_READ_SIZE: Final = 64 * 1024
_CLOSE_GRACE_SECONDS: Final = 5.0
_NEGOTIATION_ONLY: Final = "Expecting capabilities negotiation with 'qmp_capabilities'"


class _ParseError:
    __slots__ = ("desc", "fatal")

    def __init__(self, desc: str, *, fatal: bool = False) -> None:
        self.desc = desc
        self.fatal = fatal


_STRUCTURE: Final = re.compile(rb'[{}\[\]"\n]')
_IN_STRING: Final = re.compile(rb'["\\\n]')
_SCALAR_END: Final = re.compile(rb'[ \t\r\n{}\[\]",:]')
_SPACE: Final = b" \t\r\n"
# Below this size an open value is checked for an error at every newline.
_ALWAYS_CHECK: Final = 512
_MORE: Final = object()  # _MessageStream._next: no complete value yet (a JSON null is None)


class _MessageStream:
    """Splits a byte stream into JSON values without requiring newlines.

    Bytes are scanned once, as they arrive, for the structure of the value at
    the front (bracket depth, strings, escapes; like QEMU's json-streamer), and
    a value is parsed only when its brackets balance, so input that arrives in
    small pieces costs time linear in its size.  A value that does not parse is
    reported only once a newline follows the failing position (before that it
    may just be incomplete); input is then skipped through that newline, so one
    bad line does not poison the next.  Syntax errors inside a value whose
    brackets are still open are looked for at newlines: at each one while the
    value is under ``_ALWAYS_CHECK`` bytes, then each time it has doubled since
    the last look (so looking stays linear too; an error in a later line of a
    long multi-line value is then found when it doubles or closes).

    ``work`` counts the bytes scanned and parsed (for the tests).
    """

    def __init__(self) -> None:
        self._decoder = json.JSONDecoder()
        self.work = 0
        self._buf = bytearray()  # input not consumed yet; the current value starts at 0
        self._error: tuple[str, int] | None = None  # (message, skip through the newline after)
        self._consume(0)

    def _reset(self) -> None:
        self._buf = bytearray()
        self._error = None
        self._consume(0)

    def feed(self, data: bytes) -> list[object]:
        self._buf += data
        out: list[object] = []
        while (item := self._next()) is not _MORE:
            out.append(item)
        if len(self._buf) > MAX_MESSAGE_BYTES:
            self._reset()
            out.append(_ParseError(f"QMP input exceeds {MAX_MESSAGE_BYTES} bytes", fatal=True))
        return out

    def _consume(self, n: int) -> None:
        del self._buf[:n]  # O(1) amortised: CPython moves the start of a bytearray
        self._pos = 0  # scanned up to here
        self._open = False  # an object, array or string has started (at 0)
        self._in_string = False
        self._depth = 0
        self._checked = 0  # value length at the last look for an early error

    def _fail(self, desc: str, skip_from: int) -> None:
        self._error = (f"JSON parse error, {desc}", skip_from)

    def _parse(self, end: int) -> tuple[object, int] | None:
        """Parse ``_buf[:end]``: (value, bytes used), or None after entering the error state."""
        text = self._buf[:end].decode("utf-8", "replace")
        self.work += end
        try:
            value, used = self._decoder.raw_decode(text)
        except json.JSONDecodeError as exc:
            prefix = text[: exc.pos]
            at = len(prefix.encode()) - 2 * prefix.count("\ufffd")  # a replaced byte was 1 byte
            self._fail(f"{exc.msg[0].lower()}{exc.msg[1:]}", at)
            return None
        except (ValueError, RecursionError) as exc:  # int digit limit, nesting depth
            self._fail("nesting too deep" if isinstance(exc, RecursionError) else str(exc), 0)
            return None
        return value, len(text[:used].encode("utf-8", "surrogatepass")) if used < len(text) else end

    def _next(self) -> object:
        """The next complete value or error, or ``_MORE`` when more input is needed."""
        buf = self._buf
        while True:
            if self._error is not None:
                desc, skip_from = self._error
                newline = buf.find(b"\n", skip_from)
                self.work += max(len(buf) - skip_from, 0)
                if newline < 0:
                    self._error = (desc, len(buf))  # look on from here
                    return _MORE
                self._error = None
                self._consume(newline + 1)
                return _ParseError(desc)
            if not self._open:
                i = 0
                while i < len(buf) and buf[i] in _SPACE:
                    i += 1
                self.work += i
                self._consume(i)
                if not buf:
                    return _MORE
                first = buf[0]
                if first in b"{[":
                    self._open, self._depth, self._pos = True, 1, 1
                elif first == 0x22:  # "
                    self._open, self._in_string, self._pos = True, True, 1
                else:  # a bare scalar (or garbage): parse it as far as it goes now
                    m = _SCALAR_END.search(buf, 1)
                    end = len(buf) if m is None else m.start()
                    parsed = self._parse(end)
                    if parsed is None and m is None and end < 6:
                        self._error = None  # maybe a literal or number still arriving: look again
                        return _MORE
                    if parsed is not None:
                        self._consume(parsed[1])
                        return parsed[0]
                    continue
            stop = self._scan()
            if stop is None:
                if self._failed():
                    continue
                return _MORE
            parsed = self._parse(stop)
            if parsed is not None:
                self._consume(stop)
                return parsed[0]

    def _failed(self) -> bool:
        return self._error is not None

    def _scan(self) -> int | None:
        """Scan on from ``_pos``: the end of the value at the front, or None (incomplete or error)."""
        buf = self._buf
        i = self._pos
        try:
            while True:
                if self._in_string:
                    m = _IN_STRING.search(buf, i)
                    if m is None:
                        i = len(buf)
                        return None
                    j = m.start()
                    c = buf[j]
                    if c == 0x5C:  # backslash: skip the escaped byte
                        if j + 1 >= len(buf):
                            i = j
                            return None
                        i = j + 2
                        continue
                    if c == 0x0A:  # a raw newline in a string: invalid (reported at it)
                        i = j
                        if self._parse(j + 1) is not None:  # cannot happen; still, never stall
                            self._fail("invalid control character in a string", j)
                        return None
                    self._in_string = False
                    i = j + 1
                    if self._depth == 0:
                        return i
                    continue
                m = _STRUCTURE.search(buf, i)
                if m is None:
                    i = len(buf)
                    return None
                j = m.start()
                c = buf[j]
                i = j + 1
                if c == 0x22:
                    self._in_string = True
                elif c in b"{[":
                    self._depth += 1
                elif c in b"}]":
                    self._depth -= 1
                    if self._depth == 0:
                        return i
                elif i < _ALWAYS_CHECK or i >= 2 * self._checked:  # a newline in an open value:
                    # look for an error (at every newline while the value is small, then each
                    # time it has doubled: O(_ALWAYS_CHECK) per byte at most)
                    self._checked = i
                    self._early_error(i)
                    if self._error is not None:
                        return None
        finally:
            self.work += i - self._pos
            self._pos = i

    def _early_error(self, end: int) -> None:
        """Enter the error state if ``_buf[:end]`` cannot be the start of a value."""
        text = self._buf[:end].decode("utf-8", "replace")
        self.work += end
        try:
            self._decoder.raw_decode(text)
        except json.JSONDecodeError as exc:
            if text[exc.pos :].strip():  # an error before the end, not just "incomplete"
                prefix = text[: exc.pos]
                at = len(prefix.encode()) - 2 * prefix.count("\ufffd")
                self._fail(f"{exc.msg[0].lower()}{exc.msg[1:]}", at)
        except (ValueError, RecursionError) as exc:
            self._fail("nesting too deep" if isinstance(exc, RecursionError) else str(exc), 0)


class _Client:
    __slots__ = ("negotiated", "oob", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.negotiated = False
        self.oob = False

    def send(self, message: dict[str, object]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(message).encode() + b"\n")


@dataclass(frozen=True, slots=True)
class _Command:
    schema: Struct
    run: Callable[[_Client, dict[str, object]], Awaitable[object]]
    allow_oob: bool = False


_NO_ARGS: Final = Struct()
_URI: Final = Struct((Field("uri", "str"),))


def _version_string() -> str:
    try:
        return metadata.version("postcopy")
    except metadata.PackageNotFoundError:
        return "unknown"


class QMPServer:
    """Serves one MigrationControl target to any number of QMP clients."""

    def __init__(self, target: MigrationControl, *, package: str | None = None) -> None:
        self._target = target
        major, minor, micro = QEMU_VERSION
        self._greeting: dict[str, object] = {
            "QMP": {
                "version": {
                    "qemu": {"micro": micro, "minor": minor, "major": major},
                    "package": package or f"postcopy {_version_string()}",
                },
                "capabilities": ["oob"],
            }
        }
        self._server: asyncio.Server | None = None
        self._unix_path: Path | None = None
        self._unix_inode: tuple[int, int] | None = None
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._commands = self._command_table()

    # --- lifecycle ----------------------------------------------------------------

    async def start_unix(self, path: str | os.PathLike[str]) -> None:
        """Listen on a unix socket; a stale socket file left by a dead server is replaced.

        The path appears only once the socket listens (bound and listening under a
        temporary name, then renamed): a client that waits for the file never meets a
        refused connection."""
        path = Path(path)
        self._check_free(path)
        sock = self._listening_unix_socket(path)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        st = path.stat()
        self._unix_path, self._unix_inode = path, (st.st_dev, st.st_ino)
        self._target.add_event_listener(self.broadcast)

    @staticmethod
    def _listening_unix_socket(path: Path) -> socket.socket:
        # Only the owner may drive the migration: the socket file is 0600 whatever the
        # process umask (bound under a strict umask, so it is never open even briefly).
        staging = path.with_name(f".{path.name[:16]}.{secrets.token_hex(4)}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        bound: Path | None = None
        try:
            try:
                sock.bind(os.fspath(staging))
            except OSError:     # the staging name is too long for sun_path: bind in place
                staging = path
                sock.bind(os.fspath(path))
            bound = staging
            sock.listen(_UNIX_BACKLOG)
            os.chmod(staging, 0o600)
            if staging != path:
                os.rename(staging, path)
        except OSError:
            sock.close()
            if bound is not None:
                with contextlib.suppress(OSError):
                    bound.unlink()
            raise
        finally:
            os.umask(old_umask)
        return sock

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on TCP (loopback unless told otherwise); port 0 picks a free one."""
        self._server = await asyncio.start_server(self._serve, host=host, port=port)
        self._target.add_event_listener(self.broadcast)

    @staticmethod
    def _check_free(path: Path) -> None:
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(
                errno.EEXIST, f"QMP socket path {path} exists and is not a socket"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(os.fspath(path))
        except ConnectionRefusedError:
            path.unlink()  # nobody listens: a leftover of a server that died
            return
        finally:
            probe.close()
        raise OSError(errno.EADDRINUSE, f"QMP socket {path} is in use by a running server")

    @property
    def address(self) -> str | tuple[str, int]:
        """The unix path, or (host, port) actually bound."""
        if self._server is None:
            raise RuntimeError("QMP server is not started")
        if self._unix_path is not None:
            return os.fspath(self._unix_path)
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def close(self) -> None:
        """Stop listening, disconnect every client and remove the unix socket file."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        with contextlib.suppress(ValueError):
            self._target.remove_event_listener(self.broadcast)
        # Hang up on every client: each handler sees end of input, finishes the
        # commands already queued and returns; one stuck in a command is cancelled.
        for client in list(self._clients):
            client.writer.transport.abort()
        if self._tasks:
            _, stuck = await asyncio.wait(list(self._tasks), timeout=_CLOSE_GRACE_SECONDS)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        await server.wait_closed()
        if self._unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                st = self._unix_path.stat()
                if (st.st_dev, st.st_ino) == self._unix_inode:
                    self._unix_path.unlink()
            self._unix_path = None

    async def __aenter__(self) -> QMPServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- events -------------------------------------------------------------------

    def broadcast(self, event: QmpEvent) -> None:
        """Send ``event`` to every client past capabilities negotiation."""
        seconds = int(event.timestamp)
        message: dict[str, object] = {
            "timestamp": {
                "seconds": seconds,
                "microseconds": int((event.timestamp - seconds) * 1_000_000),
            },
            "event": event.name,
        }
        if event.data is not None:
            message["data"] = dict(event.data)
        for client in list(self._clients):
            if not client.negotiated:
                continue
            transport = client.writer.transport
            if transport.get_write_buffer_size() > _MAX_UNSENT_BYTES:
                log.warning("QMP client does not read its events; disconnecting it")
                transport.abort()
                continue
            client.send(message)

    # --- connection ---------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        client = _Client(writer)
        self._clients.add(client)
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=_QUEUE_LEN)
        try:
            client.send(self._greeting)
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._run_in_band(client, queue))
                await self._read(client, reader, queue, tasks)
        except* ConnectionError:
            log.debug("QMP client went away")
        finally:
            self._clients.discard(client)
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _read(
        self,
        client: _Client,
        reader: asyncio.StreamReader,
        queue: asyncio.Queue[object],
        tasks: asyncio.TaskGroup,
    ) -> None:
        stream = _MessageStream()
        try:
            while data := await reader.read(_READ_SIZE):
                for message in stream.feed(data):
                    if (
                        isinstance(message, dict)
                        and "exec-oob" in message
                        and "execute" not in message
                    ):
                        tasks.create_task(self._run_one(client, message))
                        continue
                    await queue.put(message)
                    if isinstance(message, _ParseError) and message.fatal:
                        return
        finally:
            await queue.put(None)  # end of input: the dispatcher finishes what is queued

    async def _run_in_band(self, client: _Client, queue: asyncio.Queue[object]) -> None:
        while (message := await queue.get()) is not None:
            await self._run_one(client, message)

    async def _run_one(self, client: _Client, message: object) -> None:
        client.send(await self._execute(client, message))
        await client.writer.drain()

    async def _execute(self, client: _Client, message: object) -> dict[str, object]:
        if isinstance(message, _ParseError):
            return {"error": {"class": "GenericError", "desc": message.desc}}
        if not isinstance(message, dict):
            return {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
        reply: dict[str, object]
        name = "?"
        try:
            name, arguments, oob = self._check_message(message, allow_oob=client.oob)
            command = self._lookup(client, name)
            if oob and not command.allow_oob:
                raise QMPError(f"The command {name} does not support OOB")
            result = await command.run(client, validate(arguments, command.schema))
            reply = {"return": {} if result is None else result}
        except QMPError as exc:
            desc = exc.desc
            if not client.negotiated and isinstance(exc, CommandNotFound):
                desc = _NEGOTIATION_ONLY
            reply = {"error": {"class": exc.error_class, "desc": desc}}
        except Exception as exc:
            log.exception("QMP command %s failed", name)
            reply = {
                "error": {
                    "class": "GenericError",
                    "desc": f"{name} failed: {type(exc).__name__}: {exc}",
                }
            }
        if "id" in message:
            reply["id"] = message["id"]
        return reply

    @staticmethod
    def _check_message(
        message: dict[str, object], *, allow_oob: bool
    ) -> tuple[str, dict[str, object], bool]:
        exec_key: str | None = None
        for key, value in message.items():
            if key == "execute" or (key == "exec-oob" and allow_oob):
                if not isinstance(value, str):
                    raise QMPError(f"QMP input member '{key}' must be a string")
                if exec_key is not None:
                    # QEMU meets the two in its hash order, which puts exec-oob first
                    raise QMPError("QMP input member 'execute' clashes with 'exec-oob'")
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise QMPError("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise QMPError(f"QMP input member '{key}' is unexpected")
        if exec_key is None:
            raise QMPError("QMP input lacks member 'execute'")
        arguments = message.get("arguments", {})
        assert isinstance(arguments, dict)
        return str(message[exec_key]), arguments, exec_key == "exec-oob"

    def _lookup(self, client: _Client, name: str) -> _Command:
        if name == "qmp_capabilities":
            if client.negotiated:
                raise CommandNotFound(
                    "Capabilities negotiation is already complete, command ignored"
                )
        elif not client.negotiated:
            raise CommandNotFound(f"The command {name} has not been found")
        command = self._commands.get(name)
        if command is None:
            raise CommandNotFound(f"The command {name} has not been found")
        return command

    # --- commands -----------------------------------------------------------------

    def _command_table(self) -> dict[str, _Command]:
        t = self._target

        async def qmp_capabilities(client: _Client, args: dict[str, object]) -> None:
            enable = args.get("enable", [])
            assert isinstance(enable, list)
            client.oob = "oob" in enable
            client.negotiated = True

        async def migrate(client: _Client, args: dict[str, object]) -> None:
            if args.get("blk") or args.get("inc"):
                raise QMPError(
                    "Block migration (blk, inc) is not supported by this postcopy service"
                )
            await t.migrate(str(args["uri"]), resume=bool(args.get("resume", False)))

        async def set_capabilities(client: _Client, args: dict[str, object]) -> None:
            entries = args["capabilities"]
            assert isinstance(entries, list)
            await t.migrate_set_capabilities(
                [(str(entry["capability"]), bool(entry["state"])) for entry in entries]
            )

        async def set_parameters(client: _Client, args: dict[str, object]) -> None:
            await t.migrate_set_parameters(
                **{key.replace("-", "_"): int(value) for key, value in args.items()}  # type: ignore[call-overload]
            )

        def plain(
            call: Callable[[], Awaitable[object]],
        ) -> Callable[[_Client, dict[str, object]], Awaitable[object]]:
            async def run(client: _Client, args: dict[str, object]) -> object:
                return await call()

            return run

        def with_uri(
            call: Callable[[str], Awaitable[None]],
        ) -> Callable[[_Client, dict[str, object]], Awaitable[object]]:
            async def run(client: _Client, args: dict[str, object]) -> object:
                await call(str(args["uri"]))
                return None

            return run

        capability_entry = Struct((Field("capability", Enum(CAPABILITIES)), Field("state", "bool")))
        return {
            "qmp_capabilities": _Command(
                Struct((Field("enable", ListOf(Enum(("oob",))), optional=True),)), qmp_capabilities
            ),
            "query-migrate": _Command(_NO_ARGS, plain(t.query_migrate)),
            "migrate": _Command(
                Struct(
                    (
                        Field("uri", "str"),
                        Field("blk", "bool", optional=True),
                        Field("inc", "bool", optional=True),
                        Field("detach", "bool", optional=True),
                        Field("resume", "bool", optional=True),
                    )
                ),
                migrate,
            ),
            "migrate-incoming": _Command(_URI, with_uri(t.migrate_incoming)),
            "migrate-start-postcopy": _Command(_NO_ARGS, plain(t.migrate_start_postcopy)),
            "migrate-set-capabilities": _Command(
                Struct((Field("capabilities", ListOf(capability_entry)),)), set_capabilities
            ),
            "query-migrate-capabilities": _Command(_NO_ARGS, plain(t.query_migrate_capabilities)),
            "migrate-set-parameters": _Command(
                Struct(
                    (
                        Field("max-bandwidth", "size", optional=True),
                        Field("max-postcopy-bandwidth", "size", optional=True),
                        Field("downtime-limit", "uint64", optional=True),
                    )
                ),
                set_parameters,
            ),
            "query-migrate-parameters": _Command(_NO_ARGS, plain(t.query_migrate_parameters)),
            "migrate-pause": _Command(_NO_ARGS, plain(t.migrate_pause), allow_oob=True),
            "migrate-recover": _Command(_URI, with_uri(t.migrate_recover), allow_oob=True),
            "query-status": _Command(_NO_ARGS, plain(t.query_status)),
            "quit": _Command(_NO_ARGS, plain(t.quit)),
        }

    @property
    def commands(self) -> tuple[str, ...]:
        """Every command name this server answers (after negotiation)."""
        return tuple(self._commands)
