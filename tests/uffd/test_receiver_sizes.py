"""Issue 13: the destination's receive buffers and 4 KiB stage follow the guest's RAM size."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest

from postcopy import _datapath as dp
from uffd import RamBlock
from uffd._native import lib

MiB = 1 << 20
GiB = 1 << 30


def test_sizes_scale_with_the_guest_between_floor_and_cap() -> None:
    assert lib.pc_rx_buf_size_for(dp.RX_MAIN, 0) == lib.PC_RX_BUF_MIN
    assert lib.pc_rx_buf_size_for(dp.RX_MAIN, 256 * MiB) == 512 << 10
    assert lib.pc_rx_buf_size_for(dp.RX_MAIN, 1 * GiB) == 2 * MiB
    assert lib.pc_rx_buf_size_for(dp.RX_MAIN, 64 * GiB) == lib.PC_RX_BUF_MAX == 4 * MiB
    assert lib.pc_rx_buf_size_for(dp.RX_PREEMPT, 64 * GiB) == lib.PC_RX_BUF_MIN
    assert lib.pc_rx_stage_pages_for(0) == lib.PC_RX_STAGE_MIN_PAGES
    assert lib.pc_rx_stage_pages_for(256 * MiB) == 64
    assert lib.pc_rx_stage_pages_for(64 * GiB) == lib.PC_RX_STAGE_PAGES
    for size in (16 * MiB, 256 * MiB, 1 * GiB, 8 * GiB):
        own = lib.pc_rx_buf_size_for(dp.RX_MAIN, size) + lib.pc_rx_buf_size_for(dp.RX_PREEMPT, size) \
            + 2 * 2 * lib.pc_rx_stage_pages_for(size) * 4096
        assert size < 512 * MiB or own <= size // 100, f"{size >> 20} MiB guest: {own} bytes of buffers"


@pytest.mark.parametrize("size", [4 * MiB, 2 * GiB])
def test_receivers_take_the_sizes_of_their_guest(make_block: Callable[..., RamBlock], size: int) -> None:
    b = make_block("pc.ram", size)          # not touched: only its length matters
    path = dp.DestinationPath([b], verify=False)
    a, c = socket.socketpair()
    with a, c:
        for kind in (dp.RX_MAIN, dp.RX_PREEMPT):
            rx = dp.Receiver(path, a, kind, 0)
            assert getattr(rx._rx, "in").cap == lib.pc_rx_buf_size_for(kind, size)
            assert rx._rx.stage_pages == lib.pc_rx_stage_pages_for(size)
        # a receiver made before the RAM setup starts at the floor and grows when the blocks arrive
        rx = dp.Receiver(None, a, dp.RX_MAIN, 0)
        assert getattr(rx._rx, "in").cap == lib.PC_RX_BUF_MIN
        rx.attach(path)
        assert getattr(rx._rx, "in").cap == lib.pc_rx_buf_size_for(dp.RX_MAIN, size)
        assert rx._rx.stage_pages == lib.pc_rx_stage_pages_for(size)
