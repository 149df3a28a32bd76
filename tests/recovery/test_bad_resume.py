"""A peer that answers the resume handshake with a bad received bitmap gets a
clear error, the source does not take the bitmap, and recovery goes on."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from harness import check, migrate

from postcopy import wire
from postcopy.destination import Destination
from postcopy.source import Source
from postcopy.spec import GuestSpec
from uffd import PAGE_4K

pytestmark = pytest.mark.root


def _liar(bad: bytes) -> tuple[socket.socket, threading.Thread]:
    """Accept one recovery attempt, answer its first RECV_BITMAP with ``bad``."""
    server = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        main, _ = server.accept()
        with main:
            main.recv(65536)             # the RECV_BITMAP commands
            main.sendall(bad)
            main.settimeout(5)
            try:
                while main.recv(65536):  # until the source gives up on us
                    pass
            except OSError:
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return server, t


def _bad_replies(spec: GuestSpec) -> dict[str, bytes]:
    block = spec.blocks[0]
    good = wire.encode(wire.RecvBitmap(idstr=block.idstr, bitmap=bytes(wire.recv_bitmap_size(block.size))))
    wrong_size = wire.encode(wire.RecvBitmap(idstr=block.idstr, bitmap=bytes(wire.recv_bitmap_size(block.size) + 8)))
    bad_end = good[:-1] + bytes([good[-1] ^ 0xFF])
    # right size, but a bit set past the block's last page (32 pages in a 64-bit word)
    small = next(b for b in spec.blocks if (b.size // 4096) % 64)
    padded = (1 << ((small.size // 4096) % 64 + 3)).to_bytes(8, "little")
    padding = wire.encode(wire.RecvBitmap(idstr=small.idstr, bitmap=padded))
    return {"wrong_size": wrong_size, "bad_end_mark": bad_end, "padding_bits": padding}


@pytest.mark.parametrize("kind", ["wrong_size", "bad_end_mark", "padding_bits"])
def test_bad_bitmap_in_resume_is_refused_and_recovery_retries(kind: str) -> None:
    spec = GuestSpec.simple(8 << 20, PAGE_4K, vcpus=2, pattern="seq", rate_limit=100)
    server, liar = _liar(_bad_replies(spec)[kind])
    seen: dict[str, object] = {}

    def during(src: Source, dst: Destination) -> None:
        while src.result.status != "postcopy-active":
            time.sleep(0.005)
        time.sleep(0.2)
        src.pause()
        while src.result.status != "postcopy-paused":
            time.sleep(0.005)
        src.resume(server.getsockname())       # the liar answers first
        deadline = time.monotonic() + 10
        while not src.result.recovery_errors and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["errors"] = list(src.result.recovery_errors)
        seen["status"] = src.result.status
        src.resume(seen_address["real"])        # then the real destination

    seen_address: dict[str, tuple[str, int]] = {}

    def address(real: tuple[str, int]) -> tuple[str, int]:
        seen_address["real"] = real
        return real

    o = migrate(spec, preempt=True, cap=2 << 20, during=during, address=address,
                source_options={"link_timeout": 1.0, "auto_recover": False}, dest_options={"link_timeout": 1.0})
    server.close()
    liar.join(10)
    check(o, spec)
    errors = seen["errors"]
    assert errors, "the bad bitmap was not refused"
    text = " ".join(errors).lower()   # type: ignore[arg-type]
    assert "recv_bitmap" in text or "bitmap" in text, text
    expected = {"wrong_size": ("announces",), "bad_end_mark": ("end mark", "0x0123456789abcdef"),
                "padding_bits": ("past the block's last page",)}[kind]
    assert any(e in text for e in expected), text
    assert seen["status"] in ("postcopy-paused", "postcopy-recover")
    assert o.source.recoveries == 1
