"""The commands as people run them: the report plot, demo's metrics ports, one-sentence errors."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from postcopy.commands.common import write_json

from .conftest import free_port, free_port_pair, samples, scrape, state, total

GUEST = ["--size", "32M", "--vcpus", "2", "--pattern", "random", "--guest-rate", "20000"]


def run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout)


@pytest.mark.root
def test_demo_serves_both_roles_metrics_and_the_report_plots(tmp_path: Path) -> None:
    port = free_port_pair()
    out = tmp_path / "demo.json"
    seen: dict[str, dict] = {}
    stop = threading.Event()

    def scraper() -> None:      # both endpoints while the demo runs; the last scrape in postcopy counts
        while not stop.is_set():
            for role, p in (("destination", port), ("source", port + 1)):
                try:
                    parsed = samples(scrape(p))
                except (OSError, http.client.HTTPException):     # not up yet, or gone mid-answer
                    continue
                if state(parsed) in ("postcopy-active", "completed"):
                    seen[role] = parsed
            stop.wait(0.02)

    t = threading.Thread(target=scraper)
    t.start()
    try:
        proc = run("-m", "postcopy", "demo", *GUEST, "--bandwidth-cap", "16M", "--metrics-port", str(port),
                   "--json", str(out))
    finally:
        stop.set()
        t.join()
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert set(seen) == {"destination", "source"}
    assert ("postcopy_page_faults_total", ()) in seen["destination"]      # a destination's exposition
    assert total(seen["source"], "postcopy_pages_sent_total") > 0
    # stdout is a pipe here: quiet lines, no terminal control sequences
    assert "\x1b[" not in proc.stdout
    assert any(line.startswith("demo: ") and "pages" in line for line in proc.stdout.splitlines())

    report = json.loads(out.read_text())
    assert report["status"] == "completed"
    assert report["timeline"][-1]["pages"] == 8288
    assert report["latency_histogram"]["count"] == report["fault_latency_us"]["count"]

    png = tmp_path / "run.png"
    proc = run("-m", "postcopy.commands.report", str(out), "--plot", str(png), "--json", "-")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["faults"] == report["remote_faults"]
    assert summary["bytes"] == report["timeline"][-1]["bytes"]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert image.shape[0] >= 600
    assert image.shape[1] >= 600
    assert image.std() > 0.01       # not a blank canvas


def test_report_errors_are_one_sentence(tmp_path: Path) -> None:
    missing = run("-m", "postcopy.commands.report", str(tmp_path / "nope.json"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"postcopy report: {tmp_path / 'nope.json'}: no such file"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"status": "completed"}))
    proc = run("-m", "postcopy.commands.report", str(bad), "--plot", str(tmp_path / "x.png"))
    assert proc.returncode == 2
    assert "no timeline or latency_histogram" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.root
def test_busy_metrics_port_is_one_clear_sentence() -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        proc = run("-m", "postcopy", "dest", "--listen", f"127.0.0.1:{free_port()}", "--size", "16M",
                   "--metrics-port", str(port), timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"postcopy dest: cannot serve metrics on 127.0.0.1:{port}: Address already in use"]


def test_a_demo_whose_source_fails_ends_soon_and_leaves_no_destination() -> None:
    # the source fails at its start (a hot set that is not there); its destination would wait for
    # the next source: the demo stops it, and run() returns only once no child holds its output
    proc = run("-m", "postcopy", "demo", *GUEST, "--hot-set", "/nonexistent/hot.set", "--progress", "none",
               timeout=90)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "postcopy demo: the migration failed (source exit 2, destination stopped by the demo, still waiting)")


def test_bad_qmp_address_and_ports_are_refused() -> None:
    proc = run("-m", "postcopy", "source", "--qmp", "127.0.0.1:99999", "--size", "16M", "--warmup", "0",
               timeout=60)
    assert proc.returncode == 2
    assert "port 99999 is out of range" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run("-m", "postcopy", "demo", "--metrics-port", "65535", timeout=60)
    assert proc.returncode == 2
    assert "--metrics-port 65535 must be in 1..65534" in proc.stderr


def test_a_json_report_replaces_the_file_whole(tmp_path: Path) -> None:
    # a watcher that sees the file reads all of it: written beside it, then renamed over it
    where = tmp_path / "report.json"
    where.write_text("old")
    with where.open() as before:
        write_json({"ok": True, "n": 3}, str(where))
        assert before.read() == "old"       # the old file was replaced, not rewritten in place
    assert json.loads(where.read_text()) == {"n": 3, "ok": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
