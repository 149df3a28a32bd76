"""A real external VMM stand-in (vmm.c, built here with cc) and the handler
started as the CLI runs it, in its own process."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vmm_stand_in import Handler

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


@pytest.fixture(scope="session")
def vmm_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vmm") / "vmm"
    subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-pthread", "-o", str(out), str(HERE / "vmm.c")], check=True)
    return out


@pytest.fixture
def start_handler(tmp_path: Path) -> Iterator[Any]:
    started: list[Handler] = []

    def start(mem: Path, *extra: str, metrics: bool = False) -> Handler:
        sock = tmp_path / f"h{len(started)}.sock"
        report = tmp_path / f"r{len(started)}.json"
        cmd = [sys.executable, "-m", "postcopy", "uffd-handler", "--socket", str(sock), "--mem-file", str(mem),
               "--report", str(report), *extra]
        if metrics:
            cmd += ["--metrics-port", "0"]
        log = tmp_path / f"h{len(started)}.log"
        with log.open("wb") as log_file:
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log_file)
        port = None
        if metrics:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode()
            assert "metrics on http://" in line, line
            port = int(line.rsplit(":", 1)[1].split("/")[0])
        deadline = time.monotonic() + 60     # a hang, not a slow start on a loaded machine
        while not sock.exists():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "handler did not start listening"
            time.sleep(0.02)
        h = Handler(proc, sock, report, port, log)
        started.append(h)
        return h

    yield start
    for h in started:
        h.close()


