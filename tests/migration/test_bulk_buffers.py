"""The bulk channel's kernel buffers: bounded (a page the stream already carries waits behind
them), yet large enough for two of the guest's largest host pages, whatever
net.core.rmem_max / wmem_max say (the FORCE options; root in CI)."""

from __future__ import annotations

import socket

import pytest

from postcopy._link import BULK_SOCKET_BUFFER, BULK_SOCKET_BUFFER_MAX, bound_bulk_buffers
from uffd import PAGE_2M, PAGE_4K

pytestmark = pytest.mark.root


@pytest.mark.parametrize(("page", "want"), [(PAGE_4K, BULK_SOCKET_BUFFER), (PAGE_2M, 2 * PAGE_2M),
                                            (1 << 30, BULK_SOCKET_BUFFER_MAX)], ids=["4K", "2M", "1G"])
def test_bulk_buffers_hold_two_of_the_largest_host_pages(page: int, want: int) -> None:
    with socket.socket() as s:
        bound_bulk_buffers(s, page)
        # the kernel doubles what it is given (its bookkeeping) and reports that
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * want
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * want
