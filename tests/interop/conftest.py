"""Fixtures of the QEMU interop tests."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _collect_qmp_client_garbage() -> Iterator[None]:
    """qemu.qmp's legacy client leaves its private event loop and socket to the garbage
    collector; collect them here, so the warning does not land on a later, unrelated test."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
