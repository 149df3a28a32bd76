"""What qemu.qmp never sends: refusal before negotiation, framing and malformed input."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path

import pytest

from postcopy.control import MAX_MESSAGE_BYTES, ControlState, MigrationStatus, QMPServer

NEGOTIATE_FIRST = {
    "class": "CommandNotFound",
    "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
}


async def test_commands_refused_before_negotiation(destination, raw_connect) -> None:
    state, role, _ = destination
    client = await raw_connect()
    greeting = await client.recv()
    assert greeting["QMP"]["capabilities"] == ["oob"]
    assert await client.cmd({"execute": "query-status"}) == {"error": NEGOTIATE_FIRST}
    assert await client.cmd(
        {"execute": "migrate-incoming", "arguments": {"uri": "tcp:0:1"}, "id": 9}
    ) == {
        "error": NEGOTIATE_FIRST,
        "id": 9,
    }
    assert await client.cmd({"exec-oob": "migrate-pause"}) == {
        "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}
    }
    assert role.calls == []
    # an un-negotiated client gets no events
    await state.migrate_set_capabilities([("events", True)])
    state.set_status(MigrationStatus.SETUP)
    assert await client.cmd({"execute": "qmp_capabilities", "id": "n"}) == {"return": {}, "id": "n"}
    assert await client.cmd({"execute": "query-migrate"}) == {"return": {"status": "setup"}}
    # without "oob" negotiated, exec-oob stays unknown
    assert await client.cmd({"exec-oob": "migrate-pause", "id": 3}) == {
        "error": {"class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"},
        "id": 3,
    }


@pytest.mark.parametrize(
    ("raw", "desc"),
    [
        (b"}\n", "JSON parse error, expecting value"),
        (b"[1]\n", "QMP input must be a JSON object"),
        (b'"str"\n', "QMP input must be a JSON object"),
        (b'{"execute": 1}\n', "QMP input member 'execute' must be a string"),
        (b'{"exec": "query-status"}\n', "QMP input member 'exec' is unexpected"),
        (
            b'{"execute": "query-status", "arguments": []}\n',
            "QMP input member 'arguments' must be an object",
        ),
        (b'{"arguments": {}}\n', "QMP input lacks member 'execute'"),
        (b"[" * 100_000 + b"\n", "JSON parse error, nesting too deep"),
        (b"1" * 5000 + b"\n", "JSON parse error, Exceeds the limit (4300 digits)"),
    ],
    ids=[
        "bad-json",
        "array",
        "string",
        "execute-int",
        "unknown-member",
        "arguments-array",
        "no-execute",
        "deep-nesting",
        "huge-integer",
    ],
)
async def test_malformed_input_gets_an_error_and_the_session_goes_on(
    destination, raw_connect, raw: bytes, desc: str
) -> None:
    client = await raw_connect()
    await client.recv()
    await client.cmd({"execute": "qmp_capabilities"})
    await client.send_raw(raw)
    reply = await client.recv()
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"].startswith(desc)
    assert await client.cmd({"execute": "query-migrate", "id": 1}) == {"return": {}, "id": 1}


async def test_byte_at_a_time_and_several_per_write(destination, raw_connect) -> None:
    client = await raw_connect()
    await client.recv()
    message = b'{"execute": "qmp_capabilities", "id": "\xc3\xa9"}'  # a UTF-8 id split mid-character
    for i in range(len(message)):
        await client.send_raw(message[i : i + 1])
    assert await client.recv() == {"return": {}, "id": "é"}
    # no newline needed between values, several in one write, answered in order
    await client.send_raw(b'{"execute":"query-migrate","id":1}{"execute":"query-status","id":2} ')
    assert (await client.recv())["id"] == 1
    assert (await client.recv())["id"] == 2


async def test_oversized_input_closes_the_connection(destination, raw_connect) -> None:
    client = await raw_connect()
    await client.recv()
    await client.send_raw(b'{"execute": "' + b"x" * (MAX_MESSAGE_BYTES + 10))
    reply = await client.recv()
    assert reply == {
        "error": {"class": "GenericError", "desc": f"QMP input exceeds {MAX_MESSAGE_BYTES} bytes"}
    }
    async with asyncio.timeout(5):
        assert await client.reader.read() == b""


async def test_stale_socket_file_is_replaced_and_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.fspath(path))
    stale.close()  # the file stays, nobody listens
    async with QMPServer(ControlState("source")) as first:
        await first.start_unix(path)
        assert first.address == os.fspath(path)
        second = QMPServer(ControlState("source"))
        with pytest.raises(OSError, match="is in use by a running server"):
            await second.start_unix(path)
    regular = tmp_path / "not-a-socket"
    regular.write_text("keep me")
    with pytest.raises(FileExistsError, match="exists and is not a socket"):
        await QMPServer(ControlState("source")).start_unix(regular)
    assert regular.read_text() == "keep me"


async def test_tcp_transport() -> None:
    state = ControlState("source")
    async with QMPServer(state) as server:
        await server.start_tcp("127.0.0.1", 0)
        host, port = server.address
        reader, writer = await asyncio.open_connection(host, port)
        try:
            assert "QMP" in json.loads(await reader.readline())
            writer.write(b'{"execute":"qmp_capabilities"}\n{"execute":"query-status"}\n')
            assert json.loads(await reader.readline()) == {"return": {}}
            reply = json.loads(await reader.readline())
            assert reply == {"return": {"status": "running", "singlestep": False, "running": True}}
        finally:
            writer.close()


async def test_close_disconnects_clients(socket_path: Path) -> None:
    server = QMPServer(ControlState("destination"))
    await server.start_unix(socket_path)
    reader, writer = await asyncio.open_unix_connection(socket_path)
    await reader.readline()
    async with asyncio.timeout(10):
        await server.close()
        assert await reader.read() == b""
    writer.close()
    assert not socket_path.exists()  # noqa: ASYNC240 - one stat on tmpfs


async def test_the_unix_socket_is_0600_whatever_the_umask(socket_path: Path) -> None:
    """Issue 14 case 8: under umask 000 the control socket must still be the owner's alone."""
    old = os.umask(0)
    try:
        server = QMPServer(ControlState("destination", actions=None))  # type: ignore[arg-type]  # never called here
        await server.start_unix(socket_path)
        assert os.umask(0) == 0            # the process umask was restored
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(socket_path).st_mode) == 0o600
    finally:
        await server.close()


def test_the_socket_path_appears_only_once_it_listens(tmp_path: Path) -> None:
    """Orchestrators wait for the socket file, then connect: a file that exists before
    listen() would refuse them (bound, not yet listening)."""
    path = tmp_path / "qmp.sock"
    sock = QMPServer._listening_unix_socket(path)
    try:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["qmp.sock"]     # no staging name left
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(os.fspath(path))     # queued by the backlog: nobody accepts yet
    finally:
        sock.close()
        path.unlink()
    # a path whose staging name would not fit sun_path (108 bytes) is bound in place
    deep = tmp_path / ("d" * (100 - len(os.fspath(tmp_path)) - 1))
    deep.mkdir()
    short = deep / "q.sock"         # 107 bytes at most; its staging name would be 10 more
    sock = QMPServer._listening_unix_socket(short)
    try:
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(os.fspath(short))
        assert [p.name for p in deep.iterdir()] == ["q.sock"]
    finally:
        sock.close()
