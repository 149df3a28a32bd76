"""Differential: the same QMP exchange against real QEMU 7.2 and against our server.

QEMU runs with ``-machine none -incoming defer`` (a destination before
``migrate-incoming``), our server as a destination ControlState in the same
state; every reply must be identical, error texts included.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from postcopy.control import ControlState, QMPServer

# Replies that depend on nothing but the request and the "no migration yet" state.
EXCHANGE: list[object] = [
    {"execute": "query-status"},
    {"exec-oob": "migrate-pause"},
    {"execute": "qmp_capabilities", "arguments": {"enable": "oob"}},
    {"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}},
    {"execute": "qmp_capabilities", "arguments": {"x": 1}},
    {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}, "id": 1},
    {"execute": "qmp_capabilities"},
    {"execute": "nope", "id": "x"},
    {"execute": "query-migrate", "id": {"a": [1, None]}},
    {"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": "x"}},
    {"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 1.5}},
    {"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 18446744073709551616}},
    {"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": None}},
    {"execute": "migrate-set-parameters", "arguments": {"downtime-limit": "x"}},
    {"execute": "migrate-set-parameters", "arguments": {"downtime-limit": 3000000}},
    {"execute": "migrate-set-parameters", "arguments": {"downtime-limit": -1}},
    {"execute": "migrate-set-parameters", "arguments": {"max-postcopy-bandwidth": True}},
    {"execute": "migrate-set-parameters", "arguments": {"bogus": 1}},
    {
        "execute": "migrate-set-parameters",
        "arguments": {
            "max-bandwidth": 30000000,
            "downtime-limit": 1,
            "max-postcopy-bandwidth": 4096,
        },
    },
    {
        "execute": "migrate-set-capabilities",
        "arguments": {"capabilities": [{"capability": "bogus", "state": True}]},
    },
    {
        "execute": "migrate-set-capabilities",
        "arguments": {"capabilities": [{"capability": "events", "state": 1}]},
    },
    {
        "execute": "migrate-set-capabilities",
        "arguments": {"capabilities": [{"capability": "events"}]},
    },
    {
        "execute": "migrate-set-capabilities",
        "arguments": {"capabilities": {"capability": "events"}},
    },
    {"execute": "migrate-set-capabilities", "arguments": {}},
    {
        "execute": "migrate-set-capabilities",
        "arguments": {"capabilities": [{"capability": "events", "state": True, "x": 1}]},
    },
    {
        "execute": "migrate-set-capabilities",
        "arguments": {"capabilities": [{"capability": 1, "state": True}]},
    },
    {"execute": "migrate-set-capabilities", "arguments": {"capabilities": [1]}},
    {
        "execute": "migrate-set-capabilities",
        "arguments": {"capabilities": [{"capability": "postcopy-preempt", "state": True}]},
    },
    {
        "execute": "migrate-set-capabilities",
        "arguments": {
            "capabilities": [
                {"capability": "postcopy-ram", "state": True},
                {"capability": "postcopy-preempt", "state": True},
                {"capability": "postcopy-blocktime", "state": True},
                {"capability": "return-path", "state": True},
            ]
        },
    },
    {"execute": "query-migrate-capabilities"},
    {"execute": "migrate-incoming"},
    {"execute": "migrate-incoming", "arguments": {"uri": 5}},
    {"execute": "migrate"},
    {"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:1", "resume": "yes"}},
    {"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:1"}},
    {"execute": "migrate-start-postcopy"},
    {"execute": "migrate-start-postcopy", "arguments": {"x": 1}},
    {"execute": "migrate-pause"},
    {"exec-oob": "migrate-pause", "id": 3},
    {"exec-oob": "query-status"},
    {"execute": "query-status", "exec-oob": "migrate-pause"},
    {"execute": "migrate-recover"},
    {"execute": "migrate-recover", "arguments": {"uri": "tcp:127.0.0.1:1"}},
    {"execute": "query-migrate"},
    {"execute": "query-status"},
    {"execute": "query-status", "arguments": {"x": 1}},
    {"execute": 1},
    {"exec": "query-status"},
    [1],
    "str",
    {"execute": "query-status", "arguments": []},
    {"a": 1, "id": 5},
    {"arguments": {}},
]


async def converse(path: Path) -> list[object]:
    async with asyncio.timeout(30):
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            replies: list[object] = [json.loads(await reader.readline())["QMP"]["capabilities"]]
            for message in EXCHANGE:
                writer.write(json.dumps(message).encode() + b"\n")
                replies.append(json.loads(await reader.readline()))
            return replies
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def qemu(path: Path) -> AsyncIterator[None]:
    binary = shutil.which("qemu-system-x86_64")
    assert binary
    proc = await asyncio.create_subprocess_exec(
        binary, "-machine", "none", "-nodefaults", "-display", "none", "-S",
        "-qmp", f"unix:{path},server=on,wait=off", "-incoming", "defer",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(20):
            while not os.path.exists(path):  # noqa: ASYNC240 - QEMU gives no other readiness signal
                assert proc.returncode is None, "QEMU exited at startup"
                await asyncio.sleep(0.02)
        yield
    finally:
        proc.kill()
        await proc.communicate()


@pytest.mark.qemu
async def test_replies_match_qemu_7_2(tmp_path: Path) -> None:
    async with qemu(tmp_path / "qemu.sock"):
        theirs = await converse(tmp_path / "qemu.sock")
    state = ControlState("destination")
    async with QMPServer(state) as server:
        await server.start_unix(tmp_path / "ours.sock")
        ours = await converse(tmp_path / "ours.sock")
    mismatches = [
        f"{message}\n  qemu: {want}\n  ours: {got}"
        for message, want, got in zip(["greeting", *EXCHANGE], theirs, ours, strict=True)
        if want != got
    ]
    assert not mismatches, "\n".join(mismatches)
