"""Helpers for the uffd-handler tests and bench: memory files, the handler run
as the CLI runs it, and the result line of the VMM stand-in (tests/handler/vmm.c)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

def make_memory_file(path: Path, size: int, seed: int = 7) -> Path:
    """Distinct, non-zero content on every 4 KiB page (so a misplaced page is caught)."""
    import random

    rng = random.Random(seed)
    block = rng.randbytes(1 << 20)
    with path.open("wb") as f:
        for i in range(size >> 20):
            f.write(i.to_bytes(8, "little") + block[8:])
    data = bytearray(path.read_bytes())
    for page in range(size // 4096):
        data[page * 4096 + 8: page * 4096 + 16] = page.to_bytes(8, "little")
    path.write_bytes(data)
    return path


def expected_checksum(mem: Path, size: int, zero: tuple[int, int] | None = None) -> int:
    data = bytearray(mem.read_bytes()[:size])
    if zero is not None:
        off, length = zero
        data[off: off + length] = bytes(length)
    return sum(memoryview(data).cast("Q")) % (1 << 64)


@dataclass
class Handler:
    proc: subprocess.Popen[bytes]
    socket: Path
    report_path: Path
    metrics_port: int | None = None

    def server_pid(self) -> int:
        """The serving process (the supervisor's one child)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        return int(children[0])

    def wait_server_changed(self, old: int, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid = self.server_pid()
                if pid != old:
                    return pid
            except AssertionError:
                pass
            time.sleep(0.01)
        raise AssertionError("the serving process was not restarted")

    log_path: Path | None = None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path is not None and self.log_path.exists() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=20)
        self.close()
        assert self.proc.returncode == 0, self.log()
        return json.loads(self.report_path.read_text())

    def report(self) -> dict[str, Any]:
        return json.loads(self.report_path.read_text())


def run_vmm(binary: Path, handler: Handler, mem: Path, *args: str, timeout: float = 60) -> dict[str, str]:
    out = subprocess.run([str(binary), str(handler.socket), str(mem), *args], capture_output=True, timeout=timeout,
                         check=False)
    return parse_result(out.stdout.decode(), out.stderr.decode(), out.returncode)


def parse_result(stdout: str, stderr: str, rc: int) -> dict[str, str]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"vmm rc={rc} printed no result; stdout={stdout!r} stderr={stderr!r}"
    fields = dict(kv.split("=", 1) for kv in lines[-1].split()[1:])
    fields["rc"] = str(rc)
    return fields

