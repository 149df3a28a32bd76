"""Live mode: ``postcopy uffd-handler --listen`` serves a real external VMM
stand-in (vmm.c: two regions at unrelated addresses, its uffd sent over the
socket) from the postcopy stream of ``postcopy source --mem-file``, and every
page the VMM reads matches the memory file."""

from __future__ import annotations

import json
import socket
import select
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from vmm_stand_in import expected_checksum, make_memory_file, parse_result

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent.parent
pytestmark = pytest.mark.root   # kernel-mode faults of another process's memory


@pytest.fixture(scope="module")
def mem12(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_memory_file(tmp_path_factory.mktemp("mem") / "mem12.bin", 12 * MiB)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Live:
    handler: subprocess.Popen[bytes]
    vmm: subprocess.Popen[bytes]
    port: int
    report_path: Path
    log_path: Path
    metrics_port: int | None

    def log(self) -> str:
        return self.log_path.read_text()

    def source(self, mem: Path, *extra: str, timeout: float = 90) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "postcopy", "source", "--mem-file", str(mem), "--connect",
                               f"127.0.0.1:{self.port}", "--progress", "none", *extra],
                              cwd=ROOT, capture_output=True, timeout=timeout, check=False)

    def vmm_result(self) -> dict[str, str]:
        out, err = self.vmm.communicate(timeout=60)
        return parse_result(out.decode(), err.decode(), self.vmm.returncode)

    def report(self) -> dict[str, Any]:
        assert self.handler.wait(timeout=30) is not None
        return json.loads(self.report_path.read_text())


@pytest.fixture
def start_live(tmp_path: Path, vmm_binary: Path) -> Iterator[Any]:
    started: list[Live] = []

    def start(mem: Path, *handler_args: str, vmm_args: tuple[str, ...] = (), metrics: bool = False) -> Live:
        sock = tmp_path / f"live{len(started)}.sock"
        report = tmp_path / f"live{len(started)}.json"
        log = tmp_path / f"live{len(started)}.log"
        port = _free_port()
        cmd = [sys.executable, "-m", "postcopy", "uffd-handler", "--socket", str(sock), "--listen",
               f"127.0.0.1:{port}", "--report", str(report), *handler_args]
        if metrics:
            cmd += ["--metrics-port", "0"]
        with log.open("wb") as log_file:
            handler = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log_file)
        deadline = time.monotonic() + 60     # a hang, not a slow start on a loaded machine
        while not sock.exists():
            assert handler.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "handler did not start listening"
            time.sleep(0.02)
        vmm = subprocess.Popen([str(vmm_binary), str(sock), str(mem), "--regions", f"{8 * MiB},{4 * MiB}",
                                "--wait-eof", *vmm_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        metrics_port = None
        if metrics:
            assert handler.stdout is not None
            ready, _, _ = select.select([handler.stdout], [], [], 30)     # bounded: a failure says why
            assert ready, f"no metrics line in 30 s; vmm: {vmm.poll()}, handler log: {log.read_text()}"
            line = handler.stdout.readline().decode()
            assert "metrics on http://" in line, (line, log.read_text())
            metrics_port = int(line.rsplit(":", 1)[1].split("/")[0])
        live = Live(handler, vmm, port, report, log, metrics_port)
        started.append(live)
        return live

    yield start
    for live in started:
        for proc in (live.vmm, live.handler):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


@pytest.mark.parametrize("preempt", [True, False], ids=["preempt", "no-preempt"])
def test_live_stream_into_the_vmm_every_page_matches(start_live: Any, mem12: Path, preempt: bool) -> None:
    flag = "--preempt" if preempt else "--no-preempt"
    live = start_live(mem12, flag, vmm_args=("--threads", "2"))
    # capped: the VMM's reads outrun the background stream, so some of them must become requests
    src = live.source(mem12, flag, "--bandwidth-cap", "8M")
    assert src.returncode == 0, (src.stderr.decode(), live.log())
    res = live.vmm_result()
    assert res["ok"] == "1", (res, live.log())
    assert int(res["checksum"], 16) == expected_checksum(mem12, 12 * MiB)
    report = live.report()
    assert live.handler.returncode == 0, live.log()
    m = report["migration"]
    assert report["mode"] == "live"
    assert report["error"] is None
    assert report["handed_back"] is True
    assert m["status"] == "completed"
    assert m["pages"] == {"received": 3072, "total": 3072}
    assert m["remote_faults"] > 0           # the VMM's faults became page requests
    assert m["requests_sent"] > 0
    assert m["fault_latency_us"]["count"] > 0
    assert (m["preempt"]["normal_pages"] > 0) == preempt             # requested pages took the preempt channel
    assert {r["offset"] for r in report["vmm"]["regions"]} == {0, 8 * MiB}
    assert "runs on its own memory now" in live.log()


def test_live_dontneed_reads_zeros_while_the_stream_still_places(start_live: Any, mem12: Path) -> None:
    """MADV_DONTNEED in the VMM while pages still stream in: the removed range reads
    zeros (no streamed page lands there after the REMOVE), the rest matches."""
    live = start_live(mem12, vmm_args=("--threads", "2", "--dontneed", f"{9 * MiB},{MiB}", "--untouched-dontneed"))
    # 2 MB/s: the stream reaches the removed range (offset 9 MiB) after ~4.5 s, long after the
    # VMM read every other page (by faults) and gave the range back, even on a loaded machine.
    # The VMM does not read that range first: had it faulted it in, every page would be here
    # before the REMOVE, and the migration could end before it (CI saw removes == 0 once).
    src = live.source(mem12, "--bandwidth-cap", "2M")
    assert src.returncode == 0, (src.stderr.decode(), live.log())
    res = live.vmm_result()
    assert res["ok"] == "1", (res, live.log())
    assert int(res["checksum"], 16) == expected_checksum(mem12, 12 * MiB, zero=(9 * MiB, MiB))
    report = live.report()
    events = report["migration"]["vmm_events"]
    assert events["removes"] >= 1
    assert events["removed_pages"] == MiB // 4096
    assert report["migration"]["status"] == "completed"


def _qmp(path: Path, command: str) -> Any:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        f = s.makefile("rb")
        assert "QMP" in json.loads(f.readline())
        for name in ("qmp_capabilities", command):
            s.sendall(json.dumps({"execute": name}).encode() + b"\n")
            while True:
                reply = json.loads(f.readline())
                if "event" not in reply:
                    break
            assert "return" in reply, reply
        f.close()
        return reply["return"]


def test_link_cut_mid_stream_recovers_and_metrics_scrape(start_live: Any, mem12: Path, tmp_path: Path) -> None:
    """QMP migrate-pause on the handler breaks the link in the middle of the stream;
    the source recovers on its own (RECV_BITMAP from what the VMM already has) and
    the VMM ends with every page right. /metrics is the destination's."""
    qmp = tmp_path / "qmp.sock"
    live = start_live(mem12, "--qmp", str(qmp), "--linger", "2", vmm_args=("--threads", "1", "--think-ns", "200000"),
                      metrics=True)
    source = subprocess.Popen([sys.executable, "-m", "postcopy", "source", "--mem-file", str(mem12), "--connect",
                               f"127.0.0.1:{live.port}", "--progress", "none", "--bandwidth-cap", "4M"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:      # pause once the stream is well under way
            info = _qmp(qmp, "query-migrate")
            if info.get("status") == "postcopy-active" and info.get("ram", {}).get("transferred", 0) > 3 * MiB:
                break
            assert time.monotonic() < deadline, (info, live.log())
            time.sleep(0.05)
        _qmp(qmp, "migrate-pause")
        assert live.metrics_port is not None
        scraped = ""
        while "postcopy_recoveries_total 1.0" not in scraped:
            scraped = urllib.request.urlopen(f"http://127.0.0.1:{live.metrics_port}/metrics", timeout=5).read().decode()
            if time.monotonic() >= deadline + 30:     # the source's side of it too
                source.kill()
                _out, err = source.communicate()
                raise AssertionError((scraped, live.log(), err.decode()))
            time.sleep(0.1)
        _out, err = source.communicate(timeout=90)
        assert source.returncode == 0, (err.decode(), live.log())
    finally:
        if source.poll() is None:
            source.kill()
            source.communicate()
    res = live.vmm_result()
    assert res["ok"] == "1", (res, live.log())
    assert int(res["checksum"], 16) == expected_checksum(mem12, 12 * MiB)
    for family in ("postcopy_page_faults_total", "postcopy_fault_latency_seconds_bucket", "postcopy_pages_received"):
        assert family in scraped, scraped
    report = live.report()
    m = report["migration"]
    assert m["status"] == "completed"
    assert m["recoveries"] == 1
    assert m["pages"]["received"] == 3072
    assert m["paused_seconds"] > 0


@pytest.mark.hugetlb
def test_live_huge_pages_with_dontneed(start_live: Any, mem12: Path) -> None:
    """2 MiB hugetlbfs regions: the stream's block has 2 MiB pages, each placed whole;
    a removed huge page is unregistered (the kernel serves it as zeros)."""
    live = start_live(mem12, vmm_args=("--page-size", str(2 * MiB), "--threads", "2",
                                       "--dontneed", f"{2 * MiB},{2 * MiB}"))
    src = live.source(mem12, "--mem-page-size", "2M")
    assert src.returncode == 0, (src.stderr.decode(), live.log())
    res = live.vmm_result()
    assert res["ok"] == "1", (res, live.log())
    assert int(res["checksum"], 16) == expected_checksum(mem12, 12 * MiB, zero=(2 * MiB, 2 * MiB))
    report = live.report()
    assert report["migration"]["status"] == "completed", live.log()
    assert {r["page_size"] for r in report["vmm"]["regions"]} == {2 * MiB}
    # the VMM's MADV_DONTNEED may come after every page arrived and the regions were handed
    # back (then the kernel alone serves zeros there, as the checksum shows): 0 or the range
    assert report["migration"]["vmm_events"]["removed_pages"] in (0, 2 * MiB // 4096)
