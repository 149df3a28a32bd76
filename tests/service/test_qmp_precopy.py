"""Precopy driven over QMP as QEMU does it (issue 12): ``migrate`` starts precopy rounds while
the guest runs, they go on until ``migrate-start-postcopy``, then postcopy finishes; the
destination's guest verifies every page."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from .conftest import GUEST, free_port, postcopy, read_json, stop
from .test_qmp_flow import CAPS, connect, until

pytestmark = pytest.mark.root


async def test_precopy_rounds_until_migrate_start_postcopy(tmp_path: Path) -> None:
    dsock, ssock = tmp_path / "dst.qmp", tmp_path / "src.qmp"
    djson, sjson = tmp_path / "dest.json", tmp_path / "source.json"
    dest = postcopy("dest", "--qmp", str(dsock), *GUEST, "--guest-rate", "20000", "--run-after", "0.1",
                    "--verify", "--json", str(djson), log=tmp_path / "dest.log")
    src = postcopy("source", "--qmp", str(ssock), *GUEST, "--guest-rate", "20000", "--warmup", "0.1",
                   "--precopy-seconds", "60", "--json", str(sjson), log=tmp_path / "source.log")
    dst_q: QMPClient | None = None
    src_q: QMPClient | None = None
    try:
        dst_q = await connect(dsock, "dst", dest, tmp_path / "dest.log")
        src_q = await connect(ssock, "src", src, tmp_path / "source.log")
        for q in (dst_q, src_q):
            await q.execute("migrate-set-capabilities", {"capabilities": CAPS})
        port = free_port()
        await dst_q.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
        # slow precopy so that the rounds are visible before the switch
        await src_q.execute("migrate-set-parameters", {"max-bandwidth": 32 << 20})
        await src_q.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        async with asyncio.timeout(60):
            while True:
                info = await until(src_q, {"active"})
                if info["ram"].get("dirty-sync-count", 0) >= 3:
                    break
                await asyncio.sleep(0.05)
        assert info["ram"]["precopy-bytes"] > 0
        assert info["status"] == "active", "precopy switched to postcopy without migrate-start-postcopy"
        await src_q.execute("migrate-start-postcopy")
        sinfo = await until(src_q, {"completed"}, timeout=120)
        await until(dst_q, {"completed"}, timeout=120)
        assert sinfo["ram"]["dirty-sync-count"] >= 3
        async with asyncio.timeout(60):     # the reports are written when the migration ends
            while not (djson.exists() and sjson.exists()):  # noqa: ASYNC110 - files of other processes
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
        sreport, dreport = read_json(sjson), read_json(djson)
        assert sreport["precopy"]["rounds"] >= 3
        assert sreport["precopy"]["bytes"] > 0
        assert dreport["guest_verify"]["ok"], dreport["guest_verify"]
    finally:
        for q in (dst_q, src_q):
            if q is not None:
                await q.disconnect()
        stop(dest, src)
