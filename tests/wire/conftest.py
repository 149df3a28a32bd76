"""Shared helpers for the wire codec tests: capture loading and decode-all."""

from __future__ import annotations

import functools
import lzma
from collections.abc import Callable
from pathlib import Path

import pytest

from postcopy.wire import ConnectionClosed, NeedData


@functools.lru_cache(maxsize=16)
def _load(path: str) -> bytes:
    return lzma.open(path).read()


@pytest.fixture(scope="session")
def load_capture(captures_dir: Path) -> Callable[[str], bytes]:
    def load(rel: str) -> bytes:
        return _load(str(captures_dir / rel))

    return load


def drain(decoder) -> list:
    """All events up to and including ConnectionClosed (EOF must have been fed)."""
    out = []
    while True:
        ev = decoder.next_event()
        assert not isinstance(ev, NeedData), "decoder wants data after EOF"
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            return out


@pytest.fixture(scope="session")
def drain_events():
    return drain
