"""Metrics overhead: the same demo migration with and without the Prometheus
endpoints (scraped at 10 Hz while it runs), alternating, in one run.

    python3 bench/metrics_overhead.py [--runs 6] [--size 512M]

Prints the median throughput of each and their ratio (target: under 2 % lost).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scraper(ports: list[int], stop: threading.Event, count: list[int]) -> None:
    while not stop.wait(0.1):
        for port in ports:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1).read()
                count[0] += 1
            except OSError:
                pass


def one_run(size: str, metrics: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo.json"
        cmd = [sys.executable, "-m", "postcopy", "demo", "--size", size, "--pattern", "random",
               "--guest-rate", "50000", "--progress", "none", "--json", str(out)]
        stop, count = threading.Event(), [0]
        scraper = None
        if metrics:
            port = _free_port()
            cmd += ["--metrics-port", str(port)]
            scraper = threading.Thread(target=_scraper, args=([port, port + 1], stop, count), daemon=True)
            scraper.start()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=600)
        stop.set()
        if scraper is not None:
            scraper.join()
        return float(json.loads(out.read_text())["throughput_bytes_per_s"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=6, help="runs of each kind, alternating")
    ap.add_argument("--size", default="512M")
    args = ap.parse_args()
    without: list[float] = []
    with_metrics: list[float] = []
    started = time.monotonic()
    for _ in range(args.runs):
        without.append(one_run(args.size, False))
        with_metrics.append(one_run(args.size, True))
    a, b = statistics.median(without), statistics.median(with_metrics)
    print(f"metrics overhead, {args.runs} runs each, {args.size} guest, scraped at 10 Hz on both roles")
    print(f"  without metrics: median {a / 1e9:.3f} GB/s  [{min(without) / 1e9:.3f}..{max(without) / 1e9:.3f}]")
    print(f"  with metrics:    median {b / 1e9:.3f} GB/s  [{min(with_metrics) / 1e9:.3f}..{max(with_metrics) / 1e9:.3f}]")
    print(f"  ratio with/without: {b / a:.3f} (target >= 0.98; run-to-run spread here is larger)")
    print(f"  {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
