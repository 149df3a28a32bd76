"""The handler serving a real external process that does what Firecracker does
(vmm.c): two regions, the uffd sent over the socket, every page read back and
compared with the memory file."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from uffd._lowlevel import ffi, lib
from vmm_stand_in import expected_checksum, make_memory_file, parse_result, run_vmm

MiB = 1 << 20
pytestmark = pytest.mark.root   # kernel-mode faults of another process's memory


@pytest.fixture(scope="module")
def mem12(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_memory_file(tmp_path_factory.mktemp("mem") / "mem12.bin", 12 * MiB)


def placed_bytes(vmm: dict[str, Any]) -> int:
    return int(vmm["bytes"]["fault"] + vmm["bytes"]["fill"] + vmm["bytes"]["zero"])


@pytest.mark.parametrize("json_style", ["new", "old", "kib"])
def test_every_page_matches_the_file_and_dontneed_reads_zeros(vmm_binary: Path, start_handler: Any, mem12: Path,
                                                              json_style: str) -> None:
    h = start_handler(mem12)
    res = run_vmm(vmm_binary, h, mem12, "--regions", f"{8 * MiB},{4 * MiB}", "--json", json_style, "--threads", "2",
                  "--dontneed", f"{MiB},{256 * 1024}")
    assert res["ok"] == "1", res
    assert int(res["checksum"], 16) == expected_checksum(mem12, 12 * MiB, zero=(MiB, 256 * 1024))
    report = h.stop()
    (vmm,) = report["vmms"]
    assert vmm["pid"] > 0
    assert vmm["end_reason"] == "vmm_closed"
    assert vmm["resident"] is True
    assert vmm["time_to_resident_seconds"] > 0
    assert vmm["faults"]["copy"] > 0
    assert vmm["bytes"]["removed"] == 256 * 1024
    assert vmm["removes"] >= 1
    assert vmm["bytes"]["fault"] + vmm["bytes"]["fill"] == 12 * MiB     # each page placed once
    assert vmm["pages_already_present"] == 0
    assert vmm["latency_us"]["count"] == vmm["faults"]["copy"] + vmm["faults"]["zero"]


def test_without_fill_every_page_is_a_fault(vmm_binary: Path, start_handler: Any, mem12: Path) -> None:
    h = start_handler(mem12, "--no-fill")
    res = run_vmm(vmm_binary, h, mem12, "--regions", f"{8 * MiB},{4 * MiB}")
    assert res["ok"] == "1", res
    (vmm,) = h.stop()["vmms"]
    assert vmm["faults"]["copy"] == 3072
    assert vmm["bytes"]["fill"] == 0
    assert vmm["latency_us"]["p50"] > 0
    assert vmm["latency_us"]["p99"] >= vmm["latency_us"]["p50"]


@pytest.mark.hugetlb
def test_huge_pages_and_dontneed_unregisters(vmm_binary: Path, start_handler: Any, mem12: Path) -> None:
    h = start_handler(mem12)
    res = run_vmm(vmm_binary, h, mem12, "--page-size", str(2 * MiB), "--regions", f"{8 * MiB},{4 * MiB}",
                  "--threads", "2", "--dontneed", f"{2 * MiB},{2 * MiB}")
    assert res["ok"] == "1", res
    assert int(res["checksum"], 16) == expected_checksum(mem12, 12 * MiB, zero=(2 * MiB, 2 * MiB))
    (vmm,) = h.stop()["vmms"]
    assert {r["page_size"] for r in vmm["regions"]} == {2 * MiB}
    assert vmm["bytes"]["unregistered"] == 2 * MiB
    assert vmm["bytes"]["fault"] + vmm["bytes"]["fill"] == 12 * MiB


@pytest.mark.hugetlb
def test_huge_pages_without_fill(vmm_binary: Path, start_handler: Any, mem12: Path) -> None:
    h = start_handler(mem12, "--no-fill")
    res = run_vmm(vmm_binary, h, mem12, "--page-size", str(2 * MiB), "--regions", f"{4 * MiB},{8 * MiB}")
    assert res["ok"] == "1", res
    (vmm,) = h.stop()["vmms"]
    assert vmm["faults"]["copy"] == 6
    assert vmm["bytes"]["fault"] == 12 * MiB


def test_several_vmms_at_once(vmm_binary: Path, start_handler: Any, mem12: Path) -> None:
    h = start_handler(mem12, "--no-fill")
    procs = [subprocess.Popen([str(vmm_binary), str(h.socket), str(mem12), "--regions", f"{8 * MiB},{4 * MiB}",
                               "--seed", str(seed), "--threads", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for seed in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert parse_result(out.decode(), err.decode(), p.returncode)["ok"] == "1"
    report = h.stop()
    assert len(report["vmms"]) == 4
    assert len({v["pid"] for v in report["vmms"]}) == 4
    assert all(v["bytes"]["fault"] == 12 * MiB for v in report["vmms"])


def _paused_vmm(vmm_binary: Path, h: Any, mem: Path, *args: str) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([str(vmm_binary), str(h.socket), str(mem), *args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    assert p.stdout.readline() == b"PAUSE\n"
    return p


def _resume(p: subprocess.Popen[bytes]) -> dict[str, str]:
    out, err = p.communicate(b"go\n", timeout=60)
    return parse_result(out.decode(), err.decode(), p.returncode)


@pytest.mark.parametrize("fill", ["--no-fill", "--fill"])
def test_sigkill_of_the_server_mid_run_does_not_freeze_the_vmm(vmm_binary: Path, start_handler: Any, tmp_path: Path,
                                                               fill: str) -> None:
    mem = make_memory_file(tmp_path / "mem64.bin", 64 * MiB)
    h = start_handler(mem, fill)
    p = _paused_vmm(vmm_binary, h, mem, "--regions", f"{48 * MiB},{16 * MiB}", "--threads", "2",
                    "--pause-at", "4000")
    old = h.server_pid()
    os.kill(old, signal.SIGKILL)
    res = _resume(p)      # its faults wait for the restarted server
    assert res["ok"] == "1", res
    assert int(res["checksum"], 16) == expected_checksum(mem, 64 * MiB)
    assert h.wait_server_changed(old) != old
    report = h.stop()
    assert report["server_restarts"] == 1
    (vmm,) = report["vmms"]
    assert vmm["server_restarts"] == 1
    assert vmm["wakes"] >= 2
    # nothing placed twice: the bytes placed across both servers never exceed the guest; a
    # copy the dead server made just before dying (a page per thread, a 64 KiB fill piece) may
    # miss from its counters, not from its bitmap
    placed = vmm["bytes"]["fault"] + vmm["bytes"]["fill"]
    assert 64 * MiB - 64 * 1024 - 2 * 4096 <= placed <= 64 * MiB
    if fill == "--fill":   # the fill finds any such page (EEXIST) and records it
        assert vmm["fill"]["progress"] == 1.0
        assert vmm["resident"] is True
    else:
        assert vmm["fill"]["progress"] >= 1 - 4 / 16384


def test_server_killed_holding_faults_it_had_read(vmm_binary: Path, start_handler: Any, mem12: Path) -> None:
    """The first server dies right after reading faults, before serving them: the
    restarted one wakes those threads (UFFDIO_WAKE), they fault again and finish."""
    h = start_handler(mem12, "--no-fill", "--inject-crash-after-faults", "300")
    res = run_vmm(vmm_binary, h, mem12, "--regions", f"{8 * MiB},{4 * MiB}", "--threads", "4")
    assert res["ok"] == "1", res
    report = h.stop()
    assert report["server_restarts"] == 1
    (vmm,) = report["vmms"]
    assert vmm["faults"]["total"] >= 3072 + 1 > vmm["faults"]["copy"] == 3072   # the faults read by the dead one came again
    assert vmm["bytes"]["fault"] == 12 * MiB
    assert vmm["pages_already_present"] == 0


def _bad_client(h: Any, data: bytes, fds: list[int]) -> tuple[str, bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(h.socket))
        if fds:
            socket.send_fds(s, [data], fds)
        else:
            s.send(data)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
        return json.loads(reply)["error"], reply


def test_bad_input_is_rejected_and_other_vmms_keep_being_served(vmm_binary: Path, start_handler: Any,
                                                                mem12: Path) -> None:
    h = start_handler(mem12, "--no-fill", metrics=True)
    good = _paused_vmm(vmm_binary, h, mem12, "--regions", f"{8 * MiB},{4 * MiB}", "--pause-at", "1000")
    r, w = os.pipe()
    one = {"base_host_virt_addr": 1 << 40, "size": 4 * MiB, "offset": 0, "page_size": 4096}
    try:
        cases = [
            (json.dumps([one]).encode(), [], "no file descriptor"),
            (b"[{not json", [r], "not valid JSON"),
            (json.dumps([one, {**one, "offset": 4 * MiB}]).encode(), [r], "overlap in memory"),
            (json.dumps([{**one, "size": 16 * MiB}]).encode(), [r], "outside the memory file"),
            (json.dumps([one]).encode(), [r], "not a userfaultfd"),
            (json.dumps([one]).encode(), [r, w, r], "guest_memfd"),
        ]
        for data, fds, words in cases:
            error, _ = _bad_client(h, data, fds)    # the reply, then EOF: the connection is closed
            assert words in error, error
    finally:
        os.close(r)
        os.close(w)
    # a second message from a served VMM ends that connection with an error
    uffd = lib.pc_uffd_open_syscall(os.O_CLOEXEC | os.O_NONBLOCK)
    assert uffd >= 0
    out = ffi.new("uint64_t[2]")
    assert lib.pc_uffd_api(uffd, 0, out, out + 1) == 0
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(h.socket))
            socket.send_fds(s, [json.dumps([one]).encode()], [uffd])
            time.sleep(0.2)
            s.send(b'[{"base_host_virt_addr": 0, "size": 4096, "offset": 0}]')
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
            assert "second message" in json.loads(reply)["error"]
    finally:
        os.close(uffd)
    res = _resume(good)
    assert res["ok"] == "1", res
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{h.metrics_port}/metrics", timeout=10).read().decode()
    for line in ('postcopy_handler_handshakes_total{result="no_fd"} 1.0',
                 'postcopy_handler_handshakes_total{result="bad_json"} 1.0',
                 'postcopy_handler_handshakes_total{result="bad_regions"} 2.0',
                 'postcopy_handler_handshakes_total{result="not_uffd"} 1.0',
                 'postcopy_handler_handshakes_total{result="extra_fds"} 1.0',
                 'postcopy_handler_faults_total{kind="copy"}'):
        assert line in metrics, line
    report = h.stop()
    assert report["handshakes"]["ok"] == 2
    assert report["session_ends"]["extra_message"] == 1
    assert report["vmms"][0]["bytes"]["fault"] == 12 * MiB


def _tgkill(pid: int, tid: int, sig: int) -> None:
    """Send `sig` to one thread of another process (what the kernel may do with a kill())."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.tgkill(pid, tid, sig) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _main_thread_asleep(pid: int) -> bool:
    """The process's main thread is blocked in the kernel (state S), not running bytecode."""
    stat = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "S"


def test_sigterm_taken_by_the_metrics_thread_still_stops_the_handler(start_handler: Any, mem12: Path) -> None:
    # The kernel hands a process's signal to any thread that does not block it; Python runs
    # the handler in the main thread only, which sleeps in select() until something wakes it.
    h = start_handler(mem12, "--no-fill", metrics=True)
    pid = h.proc.pid
    # Only once nothing else will wake the main thread: the supervisor has read the serving
    # process's "ready" and sleeps in its select (a main thread running bytecode would see the
    # signal at its next instruction anyway, and the test would prove nothing).
    deadline = time.monotonic() + 30
    while not ("ready" in h.log() and _main_thread_asleep(pid)):
        assert time.monotonic() < deadline, h.log()
        time.sleep(0.01)
    others = [int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid]
    assert others, "the metrics server runs in a thread of its own"
    _tgkill(pid, others[0], signal.SIGTERM)
    try:
        h.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError("the handler did not stop on a SIGTERM that reached its metrics thread") from None
    assert h.proc.returncode == 0, h.log()
    assert not h.socket.exists()
    assert h.report()["role"] == "uffd-handler"
