"""Test-wide policy: prerequisites are checked once, by marker.

A test marked ``root``, ``hugetlb``, ``hugetlb_1g`` or ``qemu`` is skipped with a stated reason
when its prerequisite is missing, except when POSTCOPY_REQUIRE_ALL=1 (set by
tests/run.sh as root, and so in CI): then the missing prerequisite fails the
test, so nothing is silently skipped where it should run.

A test marked ``python_source`` watches the sans-IO core's Python from inside (it counts calls
through a patched module attribute, which compiled code does not look up): where this process
runs the mypyc-compiled core, it runs in a child pytest on the source (POSTCOPY_PURE_PYTHON=1).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import postcopy

REQUIRE_ALL = os.environ.get("POSTCOPY_REQUIRE_ALL") == "1"


def _free_hugepages(size_kb: int) -> int:
    path = Path(f"/sys/kernel/mm/hugepages/hugepages-{size_kb}kB/free_hugepages")
    try:
        return int(path.read_text())
    except OSError:
        return 0


def _missing(marker: str) -> str | None:
    if marker == "root":
        return None if os.geteuid() == 0 else "needs root"
    if marker == "hugetlb":
        return None if _free_hugepages(2048) >= 16 else (
            "needs free 2 MiB hugepages: echo 1200 > /proc/sys/vm/nr_hugepages"
        )
    if marker == "hugetlb_1g":
        return None if _free_hugepages(1 << 20) >= 1 else (
            "needs a free 1 GiB hugepage: echo 2 > /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"
        )
    if marker == "qemu":
        return None if shutil.which("qemu-system-x86_64") else (
            "needs qemu-system-x86_64: apt-get install qemu-system-x86"
        )
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker in ("root", "hugetlb", "hugetlb_1g", "qemu"):
        if item.get_closest_marker(marker) is None:
            continue
        reason = _missing(marker)
        if reason is None:
            continue
        if REQUIRE_ALL:
            pytest.fail(f"prerequisite missing in a run that requires all: {reason}")
        pytest.skip(reason)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if pyfuncitem.get_closest_marker("python_source") is None or not postcopy.CORE_BUILD.compiled:
        return None     # pytest calls the test here
    env = dict(os.environ, POSTCOPY_PURE_PYTHON="1")
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid],
                           cwd=pyfuncitem.config.rootpath, env=env, capture_output=True, text=True, timeout=600)
    if child.returncode != 0:
        pytest.fail(f"on the core's Python source (POSTCOPY_PURE_PYTHON=1):\n{child.stdout[-4000:]}", pytrace=False)
    return True


#: The recorded real QEMU 7.2 streams, kept in the repository (tests/data/qemu-7.2/README.md).
CAPTURES = Path(__file__).resolve().parent / "data" / "qemu-7.2"


@pytest.fixture(scope="session")
def captures_dir() -> Path:
    """The recorded real QEMU 7.2 streams (tests/data/qemu-7.2)."""
    if not CAPTURES.is_dir():
        pytest.fail(f"captures not found at {CAPTURES}: the clone is incomplete")
    return CAPTURES


@pytest.fixture(autouse=True)
def _keep_the_test_threads_nice() -> Iterator[None]:
    """A receiver or fault loop run on the test's own thread raises that thread's
    priority for good (the data path's urgent threads): put it back, so that the next
    test's threads (e.g. a guest's vCPUs, which take their creator's nice) start level."""
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    yield
    if os.getpriority(os.PRIO_PROCESS, 0) != nice:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
