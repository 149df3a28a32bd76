"""Fixtures: a ControlState served on a real unix socket in a temporary directory."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from postcopy.control import (
    ControlState,
    MigrationInfo,
    MigrationParameters,
    MigrationStatus,
    QMPServer,
)


@dataclass
class RecordingRole:
    """Stands in for a migration role (issue 4) behind ControlState: records what it is asked.

    It moves the status the way a role would, so the control flow can be checked
    end to end before the real roles exist.
    """

    state: ControlState | None = None
    calls: list[tuple[str, object]] = field(default_factory=list)
    info: MigrationInfo = field(default_factory=MigrationInfo)

    def _set(self, status: MigrationStatus) -> None:
        assert self.state is not None
        self.state.set_status(status)

    async def migrate(self, uri: str, *, resume: bool) -> None:
        self.calls.append(("migrate", (uri, resume)))
        self._set(MigrationStatus.POSTCOPY_RECOVER if resume else MigrationStatus.SETUP)

    async def migrate_incoming(self, uri: str) -> None:
        self.calls.append(("migrate_incoming", uri))
        self._set(MigrationStatus.SETUP)

    async def start_postcopy(self) -> None:
        self.calls.append(("start_postcopy", None))
        self._set(MigrationStatus.POSTCOPY_ACTIVE)

    async def pause(self) -> None:
        self.calls.append(("pause", None))
        self._set(MigrationStatus.POSTCOPY_PAUSED)

    async def recover(self, uri: str) -> None:
        self.calls.append(("recover", uri))

    def parameters_changed(self, parameters: MigrationParameters) -> None:
        self.calls.append(("parameters_changed", parameters))

    def migration_info(self) -> MigrationInfo:
        return self.info


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "qmp.sock"


async def serve(state: ControlState, path: Path) -> QMPServer:
    server = QMPServer(state)
    await server.start_unix(path)
    return server


@pytest.fixture
async def destination(
    socket_path: Path,
) -> AsyncIterator[tuple[ControlState, RecordingRole, QMPServer]]:
    role = RecordingRole()
    state = ControlState("destination", role)
    role.state = state
    server = await serve(state, socket_path)
    try:
        yield state, role, server
    finally:
        await server.close()


@pytest.fixture
async def source(socket_path: Path) -> AsyncIterator[tuple[ControlState, RecordingRole, QMPServer]]:
    role = RecordingRole()
    state = ControlState("source", role)
    role.state = state
    server = await serve(state, socket_path)
    try:
        yield state, role, server
    finally:
        await server.close()


class RawQMP:
    """A bare socket client, for what qemu.qmp will not send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: Path) -> RawQMP:
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    async def recv(self) -> dict[str, object]:
        async with asyncio.timeout(5):
            line = await self.reader.readline()
        assert line, "server closed the connection"
        value = json.loads(line)
        assert isinstance(value, dict)
        return value

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, message: object) -> dict[str, object]:
        await self.send_raw(json.dumps(message).encode() + b"\n")
        return await self.recv()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest.fixture
async def raw_connect(socket_path: Path) -> AsyncIterator[object]:
    """Opens bare socket clients to the served socket; closes them at the end."""
    opened: list[RawQMP] = []

    async def connect() -> RawQMP:
        client = await RawQMP.connect(socket_path)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.writer.close()
