"""Helpers: role processes on loopback, scrapes parsed with prometheus_client's parser."""

from __future__ import annotations

import json
import shutil
import random
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

GUEST = ["--size", "64M", "--vcpus", "2", "--pattern", "random"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_pair() -> int:
    """N with N and N+1 both free (demo's two metrics ports), below the ephemeral range: a
    port from it may be taken meanwhile by any outgoing connection, the scrapers' included."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(10000, min(low, 32768) - 1), 200):
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port
    raise RuntimeError("no two free consecutive ports below the ephemeral range")


def postcopy(*argv: str, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:     # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "postcopy", *argv], stdout=out, stderr=subprocess.STDOUT)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by (name, sorted labels), parsed by prometheus_client."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: dict, name: str, **labels: str) -> float:
    return parsed[(name, tuple(sorted(labels.items())))]


def total(parsed: dict, name: str) -> float:
    return sum(v for (n, _), v in parsed.items() if n == name)


def state(parsed: dict) -> str:
    on = [dict(lbl)["postcopy_migration_state"] for (n, lbl), v in parsed.items()
          if n == "postcopy_migration_state" and v == 1]
    assert len(on) == 1, on
    return on[0]


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus"
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
        except OSError:          # endpoint not up yet
            last = None
        if last:
            return last
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def stop(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)
