"""The sanitizer fuzz driver stays runnable (CI runs it for real under ASan/UBSan in .ci/fuzz.sh).

Here it runs briefly against the normal build: every target is reached, no
invariant breaks, and a write into a guard page next to a RAM block faults.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

DRIVER = Path(__file__).resolve().with_name("fuzz_datapath.py")
TARGETS = ("decode-main", "decode-recovery", "decode-preempt", "decode-rp", "dest", "preempt", "rp")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(DRIVER), "--allow-unsanitized", *args],
                          capture_output=True, text=True, timeout=120)


def test_driver_runs_every_target_without_breaking_an_invariant() -> None:
    res = _run("--iterations", "400", "--seconds", "60", "--seed", "3")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "400 iterations" in res.stdout
    assert "no invariant broken" in res.stdout
    for target in TARGETS:
        assert f"\n  {target} " in res.stdout, f"{target} never ran:\n{res.stdout}"
    # the destination's runs get as far as the C receive loop after RUN
    assert "postcopy-ended" in res.stdout


def test_iterations_are_deterministic() -> None:
    first, again = (_run("--iterations", "60", "--first", "100", "--seed", "5") for _ in range(2))
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert first.stdout.splitlines()[2:] == again.stdout.splitlines()[2:]


def test_a_write_next_to_a_block_faults() -> None:
    res = _run("--canary", "guard")
    assert res.returncode == -signal.SIGSEGV, res.stdout + res.stderr
