"""The handshake message, parsed without any socket (Firecracker's GuestRegionUffdMapping)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postcopy.handler import HandshakeError, Region, parse_handshake
import contextlib
import itertools

MiB = 1 << 20


def msg(*regions: dict[str, object]) -> bytes:
    return json.dumps(list(regions)).encode()


def test_current_firecracker_message_both_page_size_fields() -> None:
    data = msg({"base_host_virt_addr": 0x7F0000000000, "size": 8 * MiB, "offset": 0, "page_size": 4096, "page_size_kib": 4096},
               {"base_host_virt_addr": 0x7E0000000000, "size": 4 * MiB, "offset": 8 * MiB, "page_size": 4096,
                "page_size_kib": 4096, "gpa_start": 123})
    regions = parse_handshake(data, 1, 12 * MiB)
    assert [r.base_host_virt_addr for r in regions] == [0x7E0000000000, 0x7F0000000000]   # sorted by address
    assert regions[1] == Region(base_host_virt_addr=0x7F0000000000, size=8 * MiB, offset=0, page_size=4096)


@pytest.mark.parametrize(("fields", "page_size"), [({}, 4096), ({"page_size_kib": 2 * MiB}, 2 * MiB),
                                                   ({"page_size": 2 * MiB}, 2 * MiB)])
def test_older_senders(fields: dict[str, int], page_size: int) -> None:
    (region,) = parse_handshake(msg({"base_host_virt_addr": 0x40000000, "size": 4 * MiB, "offset": 0, **fields}), 1, 4 * MiB)
    assert region.page_size == page_size


@pytest.mark.parametrize(("data", "nfds", "kind", "words"), [
    (msg({"base_host_virt_addr": 0, "size": 4096, "offset": 0}), 0, "no_fd", "no file descriptor"),
    (msg({"base_host_virt_addr": 0, "size": 4096, "offset": 0}), 3, "extra_fds", "guest_memfd"),
    (b'[{"base_host_virt_addr": 0, "size": 4096', 1, "bad_json", "not valid JSON"),
    (b"\xff\xfe", 1, "bad_json", "not valid JSON"),
    (b'{"base_host_virt_addr": 0}', 1, "bad_json", "JSON array"),
    (b"[]", 1, "bad_regions", "no regions"),
    (b"[1]", 1, "bad_json", "JSON object"),
    (msg({"base_host_virt_addr": 0, "size": 4096}), 1, "bad_regions", "missing offset"),
    (msg({"base_host_virt_addr": -1, "size": 4096, "offset": 0}), 1, "bad_regions", "unsigned"),
    (msg({"base_host_virt_addr": 0, "size": 4096, "offset": 0, "page_size": 4096, "page_size_kib": 4}), 1,
     "bad_regions", "differ"),
    (msg({"base_host_virt_addr": 0, "size": 4096, "offset": 0, "page_size": 3000}), 1, "bad_regions", "power of two"),
    (msg({"base_host_virt_addr": 100, "size": 4096, "offset": 0}), 1, "bad_regions", "not a multiple"),
    (msg({"base_host_virt_addr": 0, "size": 0, "offset": 0}), 1, "bad_regions", "size is 0"),
    (msg({"base_host_virt_addr": 0, "size": 8 * MiB, "offset": 4096}), 1, "bad_regions", "outside the memory file"),
    (msg({"base_host_virt_addr": 0, "size": 2 * MiB, "offset": 0},
         {"base_host_virt_addr": MiB, "size": 2 * MiB, "offset": 2 * MiB}), 1, "bad_regions", "overlap in memory"),
    (msg({"base_host_virt_addr": 0, "size": 2 * MiB, "offset": 0},
         {"base_host_virt_addr": 4 * MiB, "size": 2 * MiB, "offset": MiB}), 1, "bad_regions", "overlap in the memory file"),
])
def test_bad_messages(data: bytes, nfds: int, kind: str, words: str) -> None:
    with pytest.raises(HandshakeError, match=words) as err:
        parse_handshake(data, nfds, 8 * MiB)
    assert err.value.kind == kind


@given(st.binary(max_size=300))
def test_any_bytes_give_regions_or_handshake_error(data: bytes) -> None:
    with contextlib.suppress(HandshakeError):
        parse_handshake(data, 1, 8 * MiB)


@given(st.lists(st.fixed_dictionaries({"base_host_virt_addr": st.integers(-5, 1 << 65), "size": st.integers(-5, 1 << 24),
                                        "offset": st.integers(-5, 1 << 24)},
                                       optional={"page_size": st.sampled_from([0, 4096, 2 * MiB, 5]),
                                                 "page_size_kib": st.sampled_from([4096, 2 * MiB, True])}),
                max_size=4))
def test_any_regions_give_regions_or_handshake_error(regions: list[dict[str, int]]) -> None:
    try:
        parsed = parse_handshake(json.dumps(regions).encode(), 1, 8 * MiB)
    except HandshakeError:
        return
    for a, b in itertools.pairwise(parsed):
        assert a.end <= b.base_host_virt_addr
    assert all(r.offset + r.size <= 8 * MiB and r.size % r.page_size == 0 for r in parsed)
