"""The control socket driven by the real qemu.qmp client over a real unix socket."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError, QMPClient

from postcopy.control import (
    CAPABILITIES,
    ControlState,
    MigrationInfo,
    MigrationParameters,
    MigrationStatus,
    QMPServer,
    RamStats,
)

RAM = RamStats(
    transferred=66594211,
    total=67641344,
    remaining=0,
    normal=16226,
    normal_bytes=66461696,
    duplicate=288,
    postcopy_requests=6,
    mbps=3649.77,
    pages_per_second=126403,
    dirty_sync_count=2,
    postcopy_bytes=66594211,
)


async def connected(path: Path, name: str = "test") -> QMPClient:
    client = QMPClient(name)
    async with asyncio.timeout(10):
        await client.connect(str(path))
    return client


async def test_greeting_and_negotiation(destination, socket_path: Path) -> None:
    client = await connected(socket_path)
    try:
        greeting = client.greeting
        assert greeting is not None
        assert greeting.QMP.version["qemu"] == {"micro": 0, "minor": 2, "major": 7}
        assert str(greeting.QMP.version["package"]).startswith("postcopy ")
        assert list(greeting.QMP.capabilities) == ["oob"]
        assert await client.execute("query-status") == {
            "status": "inmigrate",
            "singlestep": False,
            "running": False,
        }
        with pytest.raises(ExecuteError) as info:
            await client.execute("qmp_capabilities")
        assert info.value.error_class == "CommandNotFound"
        assert info.value.error.error.desc == (
            "Capabilities negotiation is already complete, command ignored"
        )
    finally:
        await client.disconnect()


async def test_capabilities_round_trip(destination, socket_path: Path) -> None:
    state, _, _ = destination
    client = await connected(socket_path)
    try:
        caps = [
            {"capability": "postcopy-ram", "state": True},
            {"capability": "events", "state": True},
            {"capability": "postcopy-preempt", "state": True},
            {"capability": "postcopy-blocktime", "state": True},
            {"capability": "xbzrle", "state": False},
        ]
        assert await client.execute("migrate-set-capabilities", {"capabilities": caps}) == {}
        listed = await client.execute("query-migrate-capabilities")
        assert [entry["capability"] for entry in listed] == list(CAPABILITIES)
        on = {entry["capability"] for entry in listed if entry["state"]}
        assert on == {"postcopy-ram", "events", "postcopy-preempt", "postcopy-blocktime"}
        assert state.capability("postcopy-preempt") is True
        assert state.capability("return-path") is False

        # all-or-nothing: a refused list changes nothing
        with pytest.raises(ExecuteError, match="Postcopy preempt requires postcopy-ram"):
            await client.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "postcopy-ram", "state": False}]},
            )
        assert state.capability("postcopy-ram") is True
        with pytest.raises(ExecuteError, match="Capability 'multifd' is not supported"):
            await client.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "multifd", "state": True}]},
            )
        with pytest.raises(ExecuteError) as info:
            await client.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "warp-drive", "state": True}]},
            )
        assert info.value.error_class == "GenericError"
        assert str(info.value) == "Parameter 'capability' does not accept value 'warp-drive'"
    finally:
        await client.disconnect()


async def test_parameters_round_trip(source, socket_path: Path) -> None:
    state, role, _ = source
    client = await connected(socket_path)
    try:
        assert await client.execute("query-migrate-parameters") == {
            "max-bandwidth": 134217728,
            "max-postcopy-bandwidth": 0,
            "downtime-limit": 300,
        }
        args = {"max-bandwidth": 30000000, "downtime-limit": 1, "max-postcopy-bandwidth": 4096}
        assert await client.execute("migrate-set-parameters", args) == {}
        assert await client.execute("query-migrate-parameters") == args
        assert state.parameters == MigrationParameters(30000000, 4096, 1)
        assert role.calls[-1] == ("parameters_changed", MigrationParameters(30000000, 4096, 1))
        # QEMU takes a negative uint64 and wraps it
        await client.execute("migrate-set-parameters", {"max-bandwidth": -1})
        assert state.parameters.max_bandwidth == (1 << 64) - 1
        with pytest.raises(ExecuteError) as info:
            await client.execute("migrate-set-parameters", {"downtime-limit": 2000001})
        assert str(info.value) == (
            "Parameter 'downtime_limit' expects an integer in the range of 0 to (2000 * 1000) ms"
        )
        assert state.parameters.downtime_limit == 1
    finally:
        await client.disconnect()


@pytest.mark.parametrize(
    ("command", "arguments", "error_class", "desc"),
    [
        ("migrate-warp", None, "CommandNotFound", "The command migrate-warp has not been found"),
        (
            "migrate-set-parameters",
            {"max-bandwidth": "fast"},
            "GenericError",
            "Parameter 'max-bandwidth' expects uint64",
        ),
        (
            "migrate-set-parameters",
            {"max-bandwidth": 1.5},
            "GenericError",
            "Parameter 'max-bandwidth' expects uint64",
        ),
        ("migrate-set-parameters", {"bogus": 1}, "GenericError", "Parameter 'bogus' is unexpected"),
        ("migrate-incoming", {}, "GenericError", "Parameter 'uri' is missing"),
        (
            "migrate-incoming",
            {"uri": 5},
            "GenericError",
            "Invalid parameter type for 'uri', expected: string",
        ),
        (
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "events"}]},
            "GenericError",
            "Parameter 'capabilities[0].state' is missing",
        ),
        (
            "migrate-set-capabilities",
            {"capabilities": {"capability": "events"}},
            "GenericError",
            "Invalid parameter type for 'capabilities', expected: array",
        ),
        (
            "migrate-set-capabilities",
            {"capabilities": [1]},
            "GenericError",
            "Invalid parameter type for 'capabilities[0]', expected: object",
        ),
        ("query-status", {"x": 1}, "GenericError", "Parameter 'x' is unexpected"),
        (
            "migrate-incoming",
            {"uri": "carrier-pigeon:1"},
            "GenericError",
            "unknown migration protocol: carrier-pigeon:1",
        ),
        (
            "migrate-incoming",
            {"uri": "tcp:127.0.0.1:99999"},
            "GenericError",
            "Parameter 'uri' expects tcp:HOST:PORT with PORT in 0..65535, got 'tcp:127.0.0.1:99999'",
        ),
        (
            "migrate",
            {"uri": "tcp:127.0.0.1:1"},
            "GenericError",
            "Guest is waiting for an incoming migration",
        ),
        (
            "migrate-pause",
            None,
            "GenericError",
            "migrate-pause is currently only supported during postcopy-active state",
        ),
        (
            "migrate-recover",
            {"uri": "tcp:127.0.0.1:1"},
            "GenericError",
            "Migrate recover can only be run when postcopy is paused.",
        ),
    ],
)
async def test_errors_read_like_qemu(
    destination,
    socket_path: Path,
    command: str,
    arguments: dict | None,
    error_class: str,
    desc: str,
) -> None:
    _, role, _ = destination
    client = await connected(socket_path)
    try:
        with pytest.raises(ExecuteError) as info:
            await client.execute(command, arguments)
        assert info.value.error_class == error_class
        assert info.value.error.error.desc == desc
        assert role.calls == []  # refused before reaching the role
        assert await client.execute("query-migrate") == {}  # the connection is still usable
    finally:
        await client.disconnect()


async def test_events_reach_every_negotiated_client(destination, socket_path: Path) -> None:
    state, role, _ = destination
    first = await connected(socket_path, "first")
    second = await connected(socket_path, "second")
    try:
        # without the events capability QEMU sends no MIGRATION events
        state.set_status(MigrationStatus.SETUP)
        state.set_status(MigrationStatus.NONE)
        await first.execute(
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": "events", "state": True},
                    {"capability": "postcopy-ram", "state": True},
                ]
            },
        )
        assert first.events.empty()
        await first.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:4444"})
        assert role.calls == [("migrate_incoming", "tcp:127.0.0.1:4444")]
        state.set_status(MigrationStatus.ACTIVE)
        state.set_status(MigrationStatus.POSTCOPY_ACTIVE)
        for client in (first, second):
            statuses = []
            for _ in range(3):
                async with asyncio.timeout(5):
                    event = await client.events.get()
                assert event["event"] == "MIGRATION"
                assert set(event["timestamp"]) == {"seconds", "microseconds"}
                assert 0 <= event["timestamp"]["microseconds"] < 1_000_000
                statuses.append(event["data"]["status"])
            assert statuses == ["setup", "active", "postcopy-active"]
        assert await first.execute("query-migrate") == {"status": "postcopy-active"}
    finally:
        await first.disconnect()
        await second.disconnect()


async def test_recovery_commands_out_of_band(destination, socket_path: Path) -> None:
    state, role, _ = destination
    state.set_status(MigrationStatus.POSTCOPY_ACTIVE)
    client = await connected(socket_path)
    try:
        assert await client.execute("migrate-pause", oob=True) == {}
        assert state.status is MigrationStatus.POSTCOPY_PAUSED
        assert (
            await client.execute("migrate-recover", {"uri": "unix:/run/new.sock"}, oob=True) == {}
        )
        assert role.calls == [("pause", None), ("recover", "unix:/run/new.sock")]
        with pytest.raises(ExecuteError, match="The command query-status does not support OOB"):
            await client.execute("query-status", oob=True)
    finally:
        await client.disconnect()


async def test_query_migrate_uses_qemu_field_names(source, socket_path: Path) -> None:
    state, role, _ = source
    client = await connected(socket_path)
    try:
        assert await client.execute("query-migrate") == {}
        await client.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "postcopy-ram", "state": True}]},
        )
        await client.execute("migrate", {"uri": "tcp:127.0.0.1:5555"})
        assert role.calls[-1] == ("migrate", ("tcp:127.0.0.1:5555", False))
        with pytest.raises(ExecuteError, match="There's a migration process in progress"):
            await client.execute("migrate", {"uri": "tcp:127.0.0.1:5555"})
        await client.execute("migrate-start-postcopy")
        assert state.status is MigrationStatus.POSTCOPY_ACTIVE
        role.info = MigrationInfo(
            total_time_ms=150,
            setup_time_ms=4,
            downtime_ms=2,
            ram=RAM,
            extras={"pending-requests": 0, "preempt-bytes": 12345},
        )
        state.set_status(MigrationStatus.COMPLETED)
        reply = await client.execute("query-migrate")
        assert reply["status"] == "completed"
        assert (reply["total-time"], reply["setup-time"], reply["downtime"]) == (150, 4, 2)
        assert reply["ram"]["normal-bytes"] == 66461696
        assert reply["ram"]["postcopy-requests"] == 6
        assert reply["ram"]["pages-per-second"] == 126403
        assert reply["x-postcopy"] == {"pending-requests": 0, "preempt-bytes": 12345}
        assert "postcopy-blocktime" not in reply  # a destination-only figure
        assert await client.execute("migrate-start-postcopy") == {}  # after the end: harmless
    finally:
        await client.disconnect()


async def test_destination_blocktime_only_when_completed(destination, socket_path: Path) -> None:
    state, role, _ = destination
    role.info = MigrationInfo(blocktime_ms=219, vcpu_blocktime_ms=(219, 3))
    client = await connected(socket_path)
    try:
        await client.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "postcopy-blocktime", "state": True}]},
        )
        state.set_status(MigrationStatus.POSTCOPY_ACTIVE)
        assert await client.execute("query-migrate") == {"status": "postcopy-active"}
        state.set_status(MigrationStatus.COMPLETED)
        assert await client.execute("query-migrate") == {
            "status": "completed",
            "postcopy-blocktime": 219,
            "postcopy-vcpu-blocktime": [219, 3],
        }
    finally:
        await client.disconnect()


async def test_quit_requests_shutdown(destination, socket_path: Path) -> None:
    state, _, _ = destination
    client = await connected(socket_path)
    try:
        assert not state.quit_requested.is_set()
        assert await client.execute("quit") == {}
        assert state.quit_requested.is_set()
        async with asyncio.timeout(5):
            event = await client.events.get()
        assert event["event"] == "SHUTDOWN"
        assert event["data"] == {"guest": False, "reason": "host-qmp-quit"}
    finally:
        await client.disconnect()


async def test_no_role_attached_is_a_clear_error(socket_path: Path) -> None:
    state = ControlState("source")
    async with QMPServer(state) as server:
        await server.start_unix(socket_path)
        client = await connected(socket_path)
        try:
            with pytest.raises(ExecuteError, match="migrate: no migration source is attached"):
                await client.execute("migrate", {"uri": "unix:/tmp/x"})
        finally:
            await client.disconnect()
    assert not socket_path.exists()  # noqa: ASYNC240 - one stat on tmpfs
