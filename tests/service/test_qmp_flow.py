"""A whole migration driven through the real qemu.qmp client, QEMU's order:
capabilities -> migrate-incoming / migrate -> migrate-start-postcopy ->
(migrate-pause, migrate-recover, migrate resume) -> query-migrate until completed."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from postcopy.destination import Destination
from postcopy.source import Source

from .conftest import GUEST, free_port, postcopy, read_json, samples, scrape, stop, value

pytestmark = pytest.mark.root

CAPS = [{"capability": c, "state": True}
        for c in ("events", "postcopy-ram", "postcopy-preempt", "postcopy-blocktime", "return-path")]
RECOVERY_AVAILABLE = all(hasattr(cls, m) for cls, m in
                         ((Source, "pause"), (Source, "resume"), (Destination, "pause"), (Destination, "recover")))


async def connect(path: Path, name: str, proc: subprocess.Popen[bytes], log: Path) -> QMPClient:
    client = QMPClient(name)
    async with asyncio.timeout(30):
        while not path.exists():  # noqa: ASYNC240 - the service gives no other readiness signal
            assert proc.poll() is None, log.read_text()  # noqa: ASYNC240 - only on failure
            await asyncio.sleep(0.02)
        await client.connect(str(path))
    return client


async def status_of(client: QMPClient) -> str:
    info = await client.execute("query-migrate")
    assert isinstance(info, dict)
    return str(info.get("status", "none"))


async def until(client: QMPClient, wanted: set[str], timeout: float = 60) -> dict[str, Any]:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while True:
            info = await client.execute("query-migrate")
            assert isinstance(info, dict)
            if info.get("status") in wanted:
                return info
            assert info.get("status") != "failed", info
            await asyncio.sleep(0.02)


async def collect_events(client: QMPClient, into: list[str]) -> None:
    async for event in client.events:
        if event["event"] == "MIGRATION":
            into.append(event["data"]["status"])  # noqa: PERF401 - read by the test while events arrive


async def test_whole_migration_through_qemu_qmp(tmp_path: Path) -> None:
    dsock, ssock = tmp_path / "dst.qmp", tmp_path / "src.qmp"
    mport, sport = free_port(), free_port()
    djson, sjson = tmp_path / "dest.json", tmp_path / "source.json"
    dest = postcopy("dest", "--qmp", str(dsock), *GUEST, "--guest-rate", "20000", "--run-after", "0.1",
                    "--metrics-port", str(mport), "--json", str(djson), log=tmp_path / "dest.log")
    src = postcopy("source", "--qmp", str(ssock), *GUEST, "--guest-rate", "20000", "--warmup", "0.1",
                   "--metrics-port", str(sport), "--json", str(sjson), log=tmp_path / "source.log")
    dst_q = src_q = None
    events: list[str] = []
    try:
        dst_q = await connect(dsock, "dst", dest, tmp_path / "dest.log")
        src_q = await connect(ssock, "src", src, tmp_path / "source.log")
        watcher = asyncio.create_task(collect_events(src_q, events))
        assert await dst_q.execute("query-migrate") == {}
        for q in (dst_q, src_q):
            await q.execute("migrate-set-capabilities", {"capabilities": CAPS})
        caps = {c["capability"]: c["state"] for c in await src_q.execute("query-migrate-capabilities")}  # type: ignore[union-attr]
        assert caps["postcopy-ram"]
        assert caps["postcopy-preempt"]
        assert not caps["multifd"]

        port = free_port()
        await dst_q.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        assert await status_of(dst_q) == "setup"
        # slow the background stream so that there is time to pause and recover
        await src_q.execute("migrate-set-parameters", {"max-postcopy-bandwidth": 8 << 20})
        await src_q.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        await until(src_q, {"active"})
        await asyncio.sleep(0.3)
        assert await status_of(src_q) == "active", "the switch to postcopy did not wait for migrate-start-postcopy"
        status = await src_q.execute("query-status")
        assert status["running"] is True  # type: ignore[index]

        await src_q.execute("migrate-start-postcopy")
        info = await until(src_q, {"postcopy-active"})
        await until(dst_q, {"postcopy-active"})
        assert set(info["ram"]) >= {"transferred", "normal", "duplicate", "postcopy-requests", "remaining", "total"}
        assert info["ram"]["total"] == 16480 * 4096

        if RECOVERY_AVAILABLE:
            await src_q.execute("migrate-pause")
            await until(src_q, {"postcopy-paused"})
            await until(dst_q, {"postcopy-paused"})
            # a new address, as after a failed link (the incoming one would also do)
            rport = free_port()
            await dst_q.execute("migrate-recover", {"uri": f"tcp:127.0.0.1:{rport}"})
            await src_q.execute("migrate", {"uri": f"tcp:127.0.0.1:{rport}", "resume": True})
            await until(src_q, {"postcopy-active", "completed"})
        else:
            with pytest.raises(ExecuteError) as err:
                await src_q.execute("migrate-pause")
            assert err.value.error_class == "GenericError"
            assert "not available yet" in err.value.error.desc

        # lift the cap live: the rest goes at full speed
        await src_q.execute("migrate-set-parameters", {"max-postcopy-bandwidth": 0})
        sinfo = await until(src_q, {"completed"})
        dinfo = await until(dst_q, {"completed"})
        assert sinfo["ram"]["remaining"] == 0
        assert sinfo["ram"]["normal"] + sinfo["ram"]["duplicate"] >= 16480   # pages in flight at the pause go again
        assert sinfo["total-time"] > 0
        assert "downtime" in sinfo
        assert sinfo["ram"]["transferred"] > 0   # the channels byte counters restart with a recovery
        assert dinfo["postcopy-blocktime"] >= 0
        # one entry per vCPU the data path tracks (none until the guest reports its vCPU threads)
        assert all(isinstance(ms, int) and ms >= 0 for ms in dinfo["postcopy-vcpu-blocktime"])
        assert len(dinfo["postcopy-vcpu-blocktime"]) in (0, 2)
        assert dinfo["x-postcopy"]["pages-received"] == 16480

        async with asyncio.timeout(10):
            while "completed" not in events:  # noqa: ASYNC110 - filled by the collect_events task
                await asyncio.sleep(0.02)
        expected = ["setup", "active", "postcopy-active"]
        if RECOVERY_AVAILABLE:
            expected += ["postcopy-paused", "postcopy-recover", "postcopy-active"]
        assert events == [*expected, "completed"]

        async with asyncio.timeout(30):
            while not (djson.exists() and sjson.exists()):  # noqa: ASYNC110 - written by the processes
                await asyncio.sleep(0.05)
        smetrics = samples(await asyncio.to_thread(scrape, sport))
        dmetrics = samples(await asyncio.to_thread(scrape, mport))
        assert value(smetrics, "postcopy_recoveries_total") == (1 if RECOVERY_AVAILABLE else 0)
        paused = value(smetrics, "postcopy_paused_seconds_total")
        assert (paused > 0) if RECOVERY_AVAILABLE else paused == 0
        assert read_json(djson)["pages"]["received"] == 16480
        assert read_json(sjson)["status"] == "completed"
        assert value(dmetrics, "postcopy_pages_received_total", channel="main", kind="normal") > 0

        for q in (dst_q, src_q):
            await q.execute("quit")
        watcher.cancel()
        assert await asyncio.to_thread(dest.wait, 30) == 0
        assert await asyncio.to_thread(src.wait, 30) == 0
    finally:
        for q in (dst_q, src_q):
            if q is not None:
                with contextlib.suppress(EOFError, ConnectionError):   # the server hung up after quit
                    await q.disconnect()
        stop(dest, src)
